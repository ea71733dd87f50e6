"""One set of images exported the ways a user holds them: MNIST-style IDX files, a PNG folder with one
sub-folder per class, and a zip of that folder (a helper for the tests, not a test file)."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def random_digits(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Fresh random 28×28 gray images ``[n, 28, 28]`` uint8 and labels 0..9 (every class present when n >= 10)."""
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.concatenate([np.arange(10), rng.integers(0, 10, size=max(0, n - 10))])[:n].astype(np.uint8)
    return images, labels


def write_idx(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """``root/train-images-idx3-ubyte`` and ``root/train-labels-idx1-ubyte`` (what ``data.name=mnist`` reads)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        header = struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape)
        (root / name).write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    return root


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, *, mode: str = "L") -> Path:
    """``root/<label>/<i>.png``, each image as a PNG of ``mode`` ("L", or "RGB" with three equal channels)."""
    for i, (image, label) in enumerate(zip(images, labels)):
        (root / str(int(label))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).convert(mode).save(root / str(int(label)) / f"{i:05d}.png")
    return root


def write_zip(folder: Path, path: Path) -> Path:
    """``folder`` zipped as a user would (its files under one top folder of the archive)."""
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted(folder.rglob("*.png")):
            zf.write(file, folder.name + "/" + file.relative_to(folder).as_posix())
    return path
