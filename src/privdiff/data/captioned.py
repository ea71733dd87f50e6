"""A user's own captioned images: a folder of images with their captions, for text-to-image fine-tuning.

Two conventions are read (the first one found wins):

* ``metadata.jsonl`` in the folder, one JSON object per line with ``file_name`` (relative to the
  folder) and ``text``: the layout of diffusers' text-to-image training scripts and of Hugging
  Face ``imagefolder``;
* a caption file beside each image with the same stem (``cat.png`` + ``cat.txt``, or
  ``.caption``), as kohya-style LoRA training scripts (PrivateLoRA's) expect.

Every image is resized so that its shorter side is the model's resolution (bilinear) and
center-cropped to a square, as diffusers' ``train_text_to_image.py`` does. Both an image and its
caption are private: the content fingerprint covers both. Each example's identity in the budget
registry is its image's :func:`~.dataset.example_digests` (decoded pixels before any resizing), not its
caption: the same image under another caption, or in an unlabelled image folder, is the same example,
and composing it is the conservative choice.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .dataset import DatasetError, content_fingerprint, example_digests
from .files import IMAGE_EXTENSIONS, _GRAY_BANDS, _is_hidden, _is_image_name, _open_image

__all__ = ["CaptionedImages", "load_captioned_folder", "CAPTION_EXTENSIONS"]

CAPTION_EXTENSIONS = (".txt", ".caption")


@dataclass(frozen=True, eq=False)
class CaptionedImages:
    """Images in [-1, 1] ``[N, C, R, R]`` with one caption each, the files they came from, a fingerprint of both,
    and each image's :func:`~.dataset.example_digests` (uint8 ``[N, 32]``, of its pixels before resizing)."""

    images: Tensor
    captions: tuple[str, ...]
    files: tuple[str, ...]
    fingerprint: str
    source: str
    digests: np.ndarray

    def __len__(self) -> int:
        return self.images.shape[0]


def _metadata(root: Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs of ``metadata.jsonl``, checked line by line."""
    pairs, seen = [], set()
    path = root / "metadata.jsonl"
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DatasetError(f"{where}: not a JSON object ({e})") from None
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("file_name"), str)
            or not isinstance(row.get("text"), str)
        ):
            raise DatasetError(f"{where}: each line needs a string file_name and a string text")
        name = row["file_name"]
        image = (root / name).resolve()
        if root.resolve() not in image.parents:
            raise DatasetError(f"{where}: file_name {name!r} points outside {root}")
        if not image.is_file():
            raise DatasetError(f"{where}: caption for a missing file {name!r}")
        if not _is_image_name(image.name):
            raise DatasetError(f"{where}: {name!r} is not an image ({'/'.join(IMAGE_EXTENSIONS)})")
        if image in seen:
            raise DatasetError(f"{where}: {name!r} is captioned twice")
        seen.add(image)
        pairs.append((image, row["text"]))
    if not pairs:
        raise DatasetError(f"{path}: no captioned images")
    return pairs


def _caption_files(root: Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs from a caption file beside each image (any depth); every image needs one."""
    images = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and _is_image_name(p.name) and not any(_is_hidden(part) for part in p.relative_to(root).parts)
    )
    if not images:
        raise DatasetError(f"{root}: no images ({'/'.join(IMAGE_EXTENSIONS)}) and no metadata.jsonl")
    pairs, missing = [], []
    for image in images:
        caption = next((image.with_suffix(ext) for ext in CAPTION_EXTENSIONS if image.with_suffix(ext).is_file()), None)
        if caption is None:
            missing.append(image)
            continue
        pairs.append((image, caption.read_text(encoding="utf-8").strip()))
    if missing:
        raise DatasetError(
            f"{missing[0]}: no caption ({' or '.join(CAPTION_EXTENSIONS)} beside it, or a metadata.jsonl); "
            f"{len(missing)} of {len(images)} images have none"
        )
    return pairs


def _square(image: Image.Image, resolution: int) -> Image.Image:
    """Shorter side to ``resolution`` (bilinear), then the central ``resolution × resolution`` crop."""
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize(
        (max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.Resampling.BILINEAR
    )
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def load_captioned_folder(root: str | os.PathLike, *, resolution: int, channels: int = 3) -> CaptionedImages:
    """Read a captioned image folder (see the module docstring) at ``resolution`` with ``channels`` (3: RGB, 1: grayscale).

    Raises :class:`DatasetError` (one line, naming the file) for a missing folder, captions of
    missing files, images without captions, unreadable images, and a folder that mixes
    grayscale and colour images (convert them first: which one a model wants is not for privdiff
    to guess per image).
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise DatasetError(f"resolution must be a positive integer, got {resolution!r}")
    if channels not in (1, 3):
        raise DatasetError(f"channels must be 1 or 3, got {channels!r}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(f"{path}: not a directory (expected images with metadata.jsonl or caption files)")
    pairs = _metadata(path) if (path / "metadata.jsonl").is_file() else _caption_files(path)
    images = [_open_image(p.read_bytes, str(p)) for p, _ in pairs]
    gray = [im.getbands() in _GRAY_BANDS for im in images]
    if any(gray) and not all(gray):
        g, c = gray.index(True), gray.index(False)
        raise DatasetError(
            f"{path}: mixes grayscale ({pairs[g][0].name}) and colour ({pairs[c][0].name}) images; convert them to one mode"
        )
    mode = "RGB" if channels == 3 else "L"
    arrays, digests = [], []
    for image in images:
        # the identity is the image in its own mode (as an image folder reads it), whatever the pipeline takes
        own = "L" if image.getbands() in _GRAY_BANDS else "RGB"
        native = np.asarray(image.convert(own), dtype=np.uint8)
        digests.append(example_digests((native[None] if own == "L" else native.transpose(2, 0, 1))[None])[0])
        array = np.asarray(_square(image.convert(mode), resolution), dtype=np.uint8)
        arrays.append(array[None] if mode == "L" else array.transpose(2, 0, 1))
    content = np.stack(arrays)
    captions = tuple(c for _, c in pairs)
    digest = hashlib.sha256(
        content_fingerprint(content, np.zeros(len(captions), dtype=np.int64), name="captioned", split="all").encode()
    )
    digest.update(json.dumps(captions, ensure_ascii=False).encode("utf-8"))
    return CaptionedImages(
        images=torch.from_numpy(content).float() / 127.5 - 1,
        captions=captions,
        files=tuple(str(p.relative_to(path)) for p, _ in pairs),
        fingerprint=f"sha256:{digest.hexdigest()}",
        source=str(path.resolve()),
        digests=np.stack(digests),
    )
