"""Readers for data sets the user already has on disk; nothing is ever downloaded.

* MNIST and Fashion-MNIST: the four IDX files (plain or ``.gz``) in ``root`` or ``root/raw``.
* CIFAR-10: ``cifar-10-python.tar.gz`` or its extracted ``cifar-10-batches-py/`` in ``root``.
* Image folder: ``root/<class>/<image>`` (a directory or a ``.zip`` with that layout).

Every reader validates what it reads and raises :class:`DatasetError` with a one-line
message naming the offending file, then hands canonical uint8 content to ``_to_dataset``.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from privdiff.data.builtin import DIGIT_NAMES
from privdiff.data.dataset import (
    DatasetError,
    ImageDataset,
    _check_resolution,
    _check_split,
    _to_dataset,
    example_digests,
)

__all__ = [
    "load_idx",
    "load_cifar10",
    "load_folder",
    "read_folder",
    "FolderContent",
    "FASHION_MNIST_NAMES",
    "IMAGE_EXTENSIONS",
]

FASHION_MNIST_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_TITLES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}

_CIFAR_TARBALL = "cifar-10-python.tar.gz"
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_BATCHES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}

# Bands of images treated as grayscale (converted to "L"); anything else becomes "RGB".
# Palette ("P") images count as colour even if their palette happens to be gray.
# 8-bit images are expected: Pillow clips 16-bit or float pixels when converting.
_GRAY_BANDS = {("L",), ("1",), ("L", "A")}


def _require_root(root: str | os.PathLike | None, name: str, expected: str) -> Path:
    """Return ``root`` as a Path, or raise if it is missing."""
    if root is None:
        raise DatasetError(f"{name}: needs root= (expected {expected}); nothing is downloaded")
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetError(f"{path}: not found (expected {expected})")
    return path


def _splits(name: str, split: str) -> tuple[str, ...]:
    """Source splits that make up a requested split (``"all"`` = train then test)."""
    _check_split(name, split)
    return ("train", "test") if split == "all" else (split,)


# ----------------------------------------------------------------------------- IDX


def _read_idx(path: Path, *, magic: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes (plain or gzip) into a uint8 array.

    IDX: a 4-byte big-endian magic ``0x000008nn`` (0x08 = unsigned byte, nn = number of
    dimensions), nn big-endian uint32 dimensions, then the data in C order.
    """
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from exc
    if len(raw) < 4:
        raise DatasetError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DatasetError(f"{path}: IDX magic number is 0x{found:08x}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} bytes, expected at least {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise DatasetError(
            f"{path}: {len(raw) - header} data bytes found, {expected} expected for dims {dims} "
            "(truncated or corrupt file)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(root: Path, filename: str, title: str) -> Path:
    """Locate ``filename`` (plain or ``.gz``) in ``root`` or ``root/raw``."""
    for folder in (root, root / "raw"):
        for candidate in (folder / filename, folder / f"{filename}.gz"):
            if candidate.is_file():
                return candidate
    raise DatasetError(
        f"{root / filename}: not found (expected the {title} IDX file '{filename}[.gz]' in {root} or {root / 'raw'})"
    )


def _read_idx_split(root: Path, split: str, title: str) -> tuple[np.ndarray, np.ndarray]:
    """Read and cross-check the image and label files of one MNIST-style split."""
    images_name, labels_name = _IDX_FILES[split]
    images_path = _find_idx(root, images_name, title)
    labels_path = _find_idx(root, labels_name, title)
    images = _read_idx(images_path, magic=_IDX_IMAGES_MAGIC)
    labels = _read_idx(labels_path, magic=_IDX_LABELS_MAGIC)
    n, rows, cols = images.shape
    if n == 0 or rows == 0 or cols == 0:
        raise DatasetError(f"{images_path}: empty image dims {images.shape}")
    if len(labels) != n:
        raise DatasetError(f"{images_path}: {n} images but {labels_path.name} has {len(labels)} labels")
    if labels.max() > 9:
        raise DatasetError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    return images[:, None, :, :], labels


def load_idx(
    root: str | os.PathLike | None,
    *,
    name: str = "mnist",
    split: str = "train",
    resolution: int | None = None,
) -> ImageDataset:
    """Load MNIST or Fashion-MNIST from the user's IDX files (1×28×28, 10 classes).

    Args:
        root: Directory holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each plain or
            ``.gz``), directly or in a ``raw/`` sub-folder.
        name: ``"mnist"`` or ``"fashion-mnist"``; only changes the class names and the
            name recorded in the data set (and so its fingerprint).
        split: ``"train"`` (train files), ``"test"`` (t10k files) or ``"all"`` (both, in that order).
        resolution: Optional side length to resize to.
    """
    if name not in _IDX_TITLES:
        raise DatasetError(f"{name}: not an IDX data set (expected one of {', '.join(_IDX_TITLES)})")
    title = _IDX_TITLES[name]
    path = _require_root(root, name, f"a directory holding the {title} IDX files")
    parts = [_read_idx_split(path, s, title) for s in _splits(name, split)]
    if len({p[0].shape[1:] for p in parts}) != 1:
        raise DatasetError(f"{path}: {title} train and t10k images differ in size")
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    class_names = FASHION_MNIST_NAMES if name == "fashion-mnist" else DIGIT_NAMES
    return _to_dataset(
        images,
        labels,
        name=name,
        split=split,
        num_classes=10,
        class_names=class_names,
        resolution=resolution,
        source=str(path),
    )


# --------------------------------------------------------------------------- CIFAR-10


def _unpickle(f: BinaryIO, where: str) -> Any:
    """Unpickle a CIFAR batch.

    Only ever called on the user's own CIFAR-10 files: unpickling runs code chosen by
    whoever wrote the file, so never point ``root`` at files from an untrusted source.
    """
    try:
        return pickle.load(f, encoding="bytes")
    except Exception as exc:  # unpickling can fail in many ways; all mean "not a CIFAR batch"
        raise DatasetError(f"{where}: not a readable CIFAR-10 pickle ({type(exc).__name__}: {exc})") from exc


def _cifar_files(root: Path) -> Iterator[tuple[str, str, BinaryIO]]:
    """Yield ``(basename, display path, file)`` for every file of the CIFAR-10 python version.

    Prefers the extracted ``cifar-10-batches-py/`` folder; otherwise streams the tarball
    once.
    """
    folder = root / _CIFAR_FOLDER
    tarball = root / _CIFAR_TARBALL
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_file():
                with open(path, "rb") as f:
                    yield path.name, str(path), f
        return
    if not tarball.is_file():
        raise DatasetError(
            f"{tarball}: not found (expected the CIFAR-10 python tarball '{_CIFAR_TARBALL}' "
            f"or folder '{_CIFAR_FOLDER}/' in {root})"
        )
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar:
                if member.isfile():
                    f = tar.extractfile(member)
                    if f is not None:
                        yield PurePosixPath(member.name).name, f"{tarball}/{member.name}", f
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{tarball}: cannot read the tarball ({exc})") from exc


def _cifar_batch(obj: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one unpickled batch and return uint8 ``[N, 3, 32, 32]`` images and labels."""
    if not isinstance(obj, dict) or b"data" not in obj or b"labels" not in obj:
        raise DatasetError(f"{where}: expected a dict with b'data' and b'labels'")
    data = np.asarray(obj[b"data"])
    labels = np.asarray(obj[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{where}: b'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{where}: b'labels' must be {len(data)} integers, got {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{where}: labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    # Each row is the red plane, then green, then blue, each 32×32 in row-major order.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(
    root: str | os.PathLike | None,
    *,
    split: str = "train",
    resolution: int | None = None,
) -> ImageDataset:
    """Load CIFAR-10 from the user's python-version files (3×32×32, 10 classes).

    The batches are Python pickles; they are loaded with ``pickle.load(f, encoding="bytes")``
    because that is the format CIFAR-10 ships in. Unpickling can run arbitrary code, so
    only use files you downloaded yourself from the official source.

    Args:
        root: Directory holding ``cifar-10-python.tar.gz`` or the extracted ``cifar-10-batches-py/``.
        split: ``"train"`` (data_batch_1..5), ``"test"`` (test_batch) or ``"all"`` (both, in that order).
        resolution: Optional side length to resize to.
    """
    path = _require_root(root, "cifar10", f"a directory holding '{_CIFAR_TARBALL}' or '{_CIFAR_FOLDER}/'")
    wanted = [b for s in _splits("cifar10", split) for b in _CIFAR_BATCHES[s]]
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    class_names: tuple[str, ...] | None = None
    for basename, where, f in _cifar_files(path):
        if basename in wanted:
            batches[basename] = _cifar_batch(_unpickle(f, where), where)
        elif basename == "batches.meta":
            meta = _unpickle(f, where)
            names = meta.get(b"label_names") if isinstance(meta, dict) else None
            if names is None or len(names) != 10:
                raise DatasetError(f"{where}: expected a dict with 10 b'label_names'")
            class_names = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)
    missing = [b for b in wanted if b not in batches]
    if missing:
        raise DatasetError(
            f"{path}: CIFAR-10 batch '{missing[0]}' not found (expected in '{_CIFAR_TARBALL}' or '{_CIFAR_FOLDER}/')"
        )
    images = np.concatenate([batches[b][0] for b in wanted])
    labels = np.concatenate([batches[b][1] for b in wanted])
    return _to_dataset(
        images,
        labels,
        name="cifar10",
        split=split,
        num_classes=10,
        class_names=class_names,
        resolution=resolution,
        source=str(path),
    )


# ------------------------------------------------------------------------ image folder


def _is_hidden(part: str) -> bool:
    """Dot files and macOS zip metadata are never data."""
    return part.startswith(".") or part == "__MACOSX"


def _is_image_name(name: str) -> bool:
    """Whether a file name has one of the supported image extensions."""
    return not _is_hidden(PurePosixPath(name).name) and PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def _folder_entries(root: Path) -> list[tuple[str, str, Callable[[], bytes]]]:
    """List ``(class name, display path, reader)`` for every image, sorted by class then file.

    A directory must hold one sub-folder per class with the images directly inside it;
    a ``.zip`` has the same layout, optionally wrapped in one top-level folder.
    """
    if root.is_dir():
        entries = []
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p.name)):
            files = sorted(p for p in class_dir.iterdir() if p.is_file() and _is_image_name(p.name))
            if not files:
                raise DatasetError(
                    f"{class_dir}: no images (expected {'/'.join(IMAGE_EXTENSIONS)} files in each class folder)"
                )
            entries += [(class_dir.name, str(p), p.read_bytes) for p in files]
        return entries
    try:
        with zipfile.ZipFile(root) as zf:
            names = [
                n
                for n in zf.namelist()
                if not n.endswith("/") and not any(_is_hidden(p) for p in PurePosixPath(n).parts) and _is_image_name(n)
            ]
            contents = {n: zf.read(n) for n in names}
    except (zipfile.BadZipFile, OSError, zlib.error) as exc:
        raise DatasetError(f"{root}: cannot read as a zip archive ({exc})") from exc
    parts = {n: PurePosixPath(n).parts for n in names}
    if parts and all(len(p) == 3 for p in parts.values()) and len({p[0] for p in parts.values()}) == 1:
        parts = {n: p[1:] for n, p in parts.items()}  # strip a single wrapping folder
    entries = [(p[0], f"{root}/{n}", (lambda n=n: contents[n])) for n, p in parts.items() if len(p) == 2]
    return sorted(entries, key=lambda e: (e[0], e[1]))


def _open_image(read: Callable[[], bytes], where: str) -> Image.Image:
    """Read and decode one image fully, or raise a DatasetError naming it."""
    try:
        image = Image.open(io.BytesIO(read()))
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{where}: cannot read image ({exc})") from exc
    return image


@dataclass(frozen=True)
class FolderContent:
    """What an image folder holds, before it becomes an :class:`ImageDataset`.

    Attributes:
        images: uint8 ``[N, C, H, W]`` (square), in class-then-file order.
        labels: int64 ``[N]``, the index of each image's class in ``class_names``.
        class_names: The sub-folder names, sorted.
        path: The directory or ``.zip`` read (absolute, ``~`` expanded).
        digests: uint8 ``[N, 32]``: each image's :func:`~privdiff.data.dataset.example_digests` of its
            decoded pixels *before* any resizing, so a folder read at any resolution names the same examples.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    path: Path
    digests: np.ndarray


def no_test_split_error(root: str | os.PathLike | None) -> DatasetError:
    """The error for a test split asked of an image folder that has none; names the recipe keys that give one."""
    return DatasetError(
        f"{root}: an image folder has no test split; hold out a fraction of it with data.holdout=0.1 (drawn with "
        "data.holdout_seed) or give one with data.test_root=DIR (a folder or .zip of test images)"
    )


def read_folder(root: str | os.PathLike | None, *, resolution: int | None = None) -> FolderContent:
    """Read a labelled image folder (one sub-folder per class, or a ``.zip`` with that layout) as uint8.

    Class names are the sub-folder names in sorted order; the label of an image is the
    index of its folder. Images are converted to grayscale ("L") if all of them are
    grayscale, else to "RGB" (alpha is dropped). Without ``resolution`` all images must
    have one square size; with it, each is resized with PIL (bilinear) to
    ``resolution × resolution`` first.

    Args:
        root: The directory or ``.zip`` file.
        resolution: Optional side length every image is resized to.
    """
    _check_resolution(resolution)
    path = _require_root(root, "folder", "a directory with one sub-folder per class, or a .zip of one").absolute()
    entries = _folder_entries(path)
    if not entries:
        captioned = path.is_dir() and (
            (path / "metadata.jsonl").is_file() or any(p.suffix in (".txt", ".caption") for p in path.iterdir())
        )
        if captioned:  # images with captions, not classes: text-to-image data
            raise DatasetError(
                f"{path}: captioned images (metadata.jsonl or caption files), not class sub-folders: that is "
                "text-to-image data; fine-tune a pipeline on it (privdiff train sd-dp-ldm model.pretrained=PIPELINE "
                "data.root=DIR, or sd-dp-lora), or put the images in one sub-folder per class"
            )
        raise DatasetError(f"{path}: no images (expected <class>/<image> with extensions {'/'.join(IMAGE_EXTENSIONS)})")
    class_names = tuple(sorted({e[0] for e in entries}))
    label_of = {c: i for i, c in enumerate(class_names)}
    images = [_open_image(read, where) for _, where, read in entries]
    mode = "L" if all(im.getbands() in _GRAY_BANDS for im in images) else "RGB"
    first_size, first_where = images[0].size, entries[0][1]
    if resolution is None and first_size[0] != first_size[1]:
        raise DatasetError(
            f"{first_where}: size {first_size[0]}x{first_size[1]} is not square: give the data a resolution "
            f"(data.resolution=N resizes every image to NxN)"
        )
    arrays, digests = [], []
    for image, (_, where, _) in zip(images, entries):
        if resolution is None and image.size != first_size:
            raise DatasetError(
                f"{path}: images of mixed sizes ({where} is {image.size[0]}x{image.size[1]}, {first_where} "
                f"{first_size[0]}x{first_size[1]}) need a resolution: data.resolution=N resizes every image to NxN"
            )
        image = image.convert(mode)
        if resolution is not None:
            native = np.asarray(image, dtype=np.uint8)
            digests.append(example_digests((native[None] if mode == "L" else native.transpose(2, 0, 1))[None])[0])
            image = image.resize((resolution, resolution), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        arrays.append(array[None] if mode == "L" else array.transpose(2, 0, 1))
    labels = np.array([label_of[e[0]] for e in entries], dtype=np.int64)
    stacked = np.stack(arrays)
    return FolderContent(
        images=stacked,
        labels=labels,
        class_names=class_names,
        path=path,
        digests=np.stack(digests) if digests else example_digests(stacked),
    )


def load_folder(
    root: str | os.PathLike | None,
    *,
    split: str = "all",
    resolution: int | None = None,
) -> ImageDataset:
    """Load a labelled image folder: one sub-folder per class, or a ``.zip`` with that layout.

    See :func:`read_folder` for the layout and conversions; the fingerprint is of the
    (resized) uint8 content. A folder has no test split of its own: ``split="test"`` is
    refused with a message naming ``data.holdout`` / ``data.test_root``, which
    :func:`privdiff.data.load_dataset` turns into a train/test split.

    Args:
        root: The directory or ``.zip`` file.
        split: ``"all"`` or ``"train"`` (both give every image).
        resolution: Optional side length every image is resized to.
    """
    _check_split("folder", split)
    if split == "test":
        raise no_test_split_error(root)
    content = read_folder(root, resolution=resolution)
    return _to_dataset(
        content.images,
        content.labels,
        name="folder",
        split=split,
        num_classes=len(content.class_names),
        class_names=content.class_names,
        source=str(content.path),
        digests=content.digests,
    )
