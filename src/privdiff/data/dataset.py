"""The image data set container, its content fingerprint, per-example digests, and resizing.

Every source (built-in or a user's file) ends in :func:`_to_dataset`, which takes the
canonical uint8 content, fingerprints it, digests each example (:func:`example_digests`),
scales it to [-1, 1] and resizes it, so those steps are done the same way for all data sets.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DatasetError",
    "ImageDataset",
    "SPLITS",
    "content_fingerprint",
    "example_digests",
    "resize_images",
]

SPLITS: tuple[str, ...] = ("train", "test", "all")
"""The split names every loader understands."""

_FINGERPRINT_VERSION = 1
_EXAMPLE_DIGEST_TAG = b"privdiff-example-v1"


class DatasetError(ValueError):
    """A data set could not be loaded: missing or malformed file, bad name or option.

    The message is one line that names the file (or data set) and says what was expected,
    so it can be shown to the user as is.
    """


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """An in-memory labelled image data set, ready for diffusion training.

    Images are scaled as ``x_uint8 / 127.5 - 1`` so pixel 0 maps to -1 and 255 to 1,
    the range diffusion models are trained on. The ``fingerprint`` identifies the
    exact content for the privacy ledger (see :func:`content_fingerprint`); compare
    data sets by fingerprint, not with ``==`` (which is identity, because tensors
    have no single truth value). ``frozen`` keeps the fields from being reassigned;
    it does not make the tensors read-only, so do not modify them in place.

    Attributes:
        images: float32 ``[N, C, H, W]`` with ``H == W`` and values in [-1, 1].
        labels: int64 ``[N]`` with values in ``[0, num_classes)``.
        num_classes: Number of classes (labels may leave some unused).
        name: Data set name as given to :func:`privdiff.data.load_dataset`, e.g. ``"mnist5k"``.
        split: ``"train"``, ``"test"`` or ``"all"``.
        fingerprint: ``"sha256:<hex>"`` of the source content, name and split.
        class_names: One name per class, or None when unknown.
        holdout: For data without a test split of its own (an image folder): the fraction
            held out as its test split (``data.holdout``), or None.
        holdout_seed: The seed that drew that held-out fraction, or None without ``holdout``.
        test_root: The absolute folder or ``.zip`` read as the test split (``data.test_root``), or None.
        example_digests: uint8 ``[N, 32]``: the SHA-256 of each example's canonical pixels
            (:func:`example_digests`), from which the budget registry derives the keyed
            per-example identity that follows the data across file formats and subsets; None
            when unknown (a data set built by hand), then the ledger's fingerprint alone names it.
            In memory only: never written to a run, a ledger or a cache.
        captions: One caption per example (text-to-image data: a captioned folder, or class names through
            ``data.prompt_template``), or None. Private like the images; in memory only.
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    name: str
    split: str
    fingerprint: str
    class_names: tuple[str, ...] | None = None
    holdout: float | None = None
    holdout_seed: int | None = None
    test_root: str | None = None
    example_digests: np.ndarray | None = None
    captions: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        images, labels, n = self.images, self.labels, self.images.shape[0]

        def fail(problem: str) -> NoReturn:
            raise DatasetError(f"{self.name} ({self.split}): {problem}")

        if images.dtype != torch.float32 or images.dim() != 4:
            fail(f"images must be float32 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if images.shape[2] != images.shape[3]:
            fail(f"images are {images.shape[2]}x{images.shape[3]}; only square images are supported")
        if labels.dtype != torch.int64 or labels.shape != (n,):
            fail(f"labels must be int64 [{n}], got {labels.dtype} {tuple(labels.shape)}")
        if self.num_classes < 1:
            fail(f"num_classes must be >= 1, got {self.num_classes}")
        if n and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            fail(f"labels must lie in [0, {self.num_classes}), got {int(labels.min())}..{int(labels.max())}")
        if self.split not in SPLITS:
            fail(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if not self.fingerprint.startswith("sha256:"):
            fail(f"fingerprint must start with 'sha256:', got {self.fingerprint!r}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            fail(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if self.holdout is not None and (self.holdout_seed is None or self.test_root is not None):
            fail("a held-out split needs holdout_seed and no test_root")
        if self.holdout is None and self.holdout_seed is not None:
            fail("holdout_seed without holdout")
        if self.captions is not None and len(self.captions) != n:
            fail(f"{len(self.captions)} captions for {n} examples")
        d = self.example_digests
        if d is not None and (not isinstance(d, np.ndarray) or d.dtype != np.uint8 or d.shape != (n, 32)):
            fail(
                f"example_digests must be uint8 [{n}, 32], got {getattr(d, 'dtype', type(d))} {getattr(d, 'shape', '')}"
            )

    @property
    def split_identity(self) -> dict[str, object]:
        """How this split was drawn, for the run and the ledger's data identity.

        ``{"split": ...}`` plus ``holdout`` and ``holdout_seed`` for a held-out split of data
        that has no test split, or ``test_root`` for a test split read from elsewhere.
        """
        out: dict[str, object] = {"split": self.split}
        if self.holdout is not None:
            out.update(holdout=self.holdout, holdout_seed=self.holdout_seed)
        if self.test_root is not None:
            out["test_root"] = self.test_root
        return out

    def __len__(self) -> int:
        """Number of images."""
        return self.images.shape[0]

    @property
    def resolution(self) -> int:
        """Side length in pixels (images are square)."""
        return self.images.shape[-1]

    @property
    def channels(self) -> int:
        """Number of colour channels (1 for grayscale, 3 for RGB)."""
        return self.images.shape[1]

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"shape={tuple(self.images.shape[1:])}, num_classes={self.num_classes}, "
            f"fingerprint={self.fingerprint[:19]}...)"
        )


def content_fingerprint(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    name: str,
    split: str,
    extra: dict[str, object] | None = None,
) -> str:
    """Fingerprint uint8 image content so the privacy ledger can name the exact data.

    The hash is SHA-256 over, in order: the images as uint8 ``N×C×H×W`` bytes in C order,
    the labels as int64 little-endian bytes, and the UTF-8 JSON
    ``{"name": ..., "shape": [N, C, H, W], "split": ..., "v": 1}`` (sorted keys, no spaces).
    It depends only on these values, never on the machine, platform byte order or run,
    and any change of one pixel, label, the order of the examples, the name or the
    split changes it. ``extra`` (e.g. ``{"holdout": 0.1, "holdout_seed": 0}`` for a
    held-out split) joins the JSON under the key ``"extra"``; without it the hash is
    exactly the one above, so existing fingerprints are unchanged.

    Args:
        images: uint8 array ``[N, C, H, W]``.
        labels: Integer array ``[N]``.
        name: Data set name.
        split: Split name.
        extra: Optional JSON-able description of how the split was drawn.

    Returns:
        ``"sha256:<64 hex digits>"``.
    """
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DatasetError(f"{name}: fingerprint needs uint8 [N, C, H, W] images, got {images.dtype} {images.shape}")
    digest = hashlib.sha256()
    digest.update(images.tobytes(order="C"))
    digest.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    meta: dict[str, object] = {"name": name, "shape": list(images.shape), "split": split, "v": _FINGERPRINT_VERSION}
    if extra is not None:
        meta["extra"] = extra
    digest.update(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    return "sha256:" + digest.hexdigest()


def example_digests(images: np.ndarray) -> np.ndarray:
    """SHA-256 of each example's canonical pixels: the per-example identity, before any key.

    What is hashed, per example, is exactly: the tag ``b"privdiff-example-v1"``, then
    ``C, H, W`` as three little-endian uint32, then the pixels as uint8 ``C×H×W`` bytes in C
    order, where the pixels are the decoded uint8 array *before any resizing* and a 3-channel
    image whose three channels are equal is taken as its 1-channel gray image (``C = 1``). So an
    image read from an IDX file, from a PNG (gray, or RGB with equal channels), from the same PNG
    in a zip, or from the built-in array has one digest; its label, file name, class folder, order
    and position in the set are not part of it (a re-labelled copy is the same example: composing
    it is the conservative choice). Any change of a pixel, a lossy re-encode (JPEG), a crop or a
    resize gives another digest: such a copy is *not* recognised as the same example.

    Args:
        images: uint8 ``[N, C, H, W]``.

    Returns:
        uint8 ``[N, 32]``, row i the digest of example i.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DatasetError(f"example digests need uint8 [N, C, H, W] images, got {images.dtype} {images.shape}")
    n, c, h, w = images.shape
    gray = np.zeros(n, dtype=bool)
    if c == 3:
        flat = images.reshape(n, 3, -1)
        gray = (flat[:, 0] == flat[:, 1]).all(axis=1) & (flat[:, 1] == flat[:, 2]).all(axis=1)
    out = np.empty((n, 32), dtype=np.uint8)
    header = {
        False: _EXAMPLE_DIGEST_TAG + struct.pack("<III", c, h, w),
        True: _EXAMPLE_DIGEST_TAG + struct.pack("<III", 1, h, w),
    }
    for i in range(n):
        pixels = images[i, :1] if gray[i] else images[i]
        digest = hashlib.sha256(header[bool(gray[i])])
        digest.update(np.ascontiguousarray(pixels).tobytes(order="C"))
        out[i] = np.frombuffer(digest.digest(), dtype=np.uint8)
    return out


def resize_images(images: Tensor, resolution: int, *, chunk: int = 4096) -> Tensor:
    """Resize square [-1, 1] images to ``resolution × resolution``.

    Uses bilinear interpolation with antialiasing (so downsampling does not alias),
    then clamps back to [-1, 1] because interpolation can overshoot slightly. Works
    in chunks so resizing a large set needs no large temporary buffers.

    Args:
        images: float32 ``[N, C, H, W]`` with ``H == W``.
        resolution: Target side length.

    Returns:
        float32 ``[N, C, resolution, resolution]``.
    """
    n, c, h, w = images.shape
    if h != w:
        raise DatasetError(f"cannot resize {h}x{w} images: only square images are supported")
    if h == resolution:
        return images
    out = torch.empty((n, c, resolution, resolution), dtype=images.dtype)
    for start in range(0, n, chunk):
        part = images[start : start + chunk]
        part = F.interpolate(part, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = part.clamp_(-1.0, 1.0)
    return out


def _check_split(name: str, split: str) -> None:
    """Reject a split name other than those in SPLITS."""
    if split not in SPLITS:
        raise DatasetError(f"{name}: unknown split {split!r} (expected one of {', '.join(SPLITS)})")


def _check_resolution(resolution: int | None) -> None:
    """Reject anything but None or a positive int as a target resolution."""
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
        raise DatasetError(f"resolution must be a positive int or None, got {resolution!r}")


def _to_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    name: str,
    split: str,
    num_classes: int,
    class_names: tuple[str, ...] | None = None,
    resolution: int | None = None,
    source: str | None = None,
    holdout: float | None = None,
    holdout_seed: int | None = None,
    test_root: str | None = None,
    fingerprint_extra: dict[str, object] | None = None,
    digests: np.ndarray | None = None,
) -> ImageDataset:
    """Build an :class:`ImageDataset` from canonical uint8 content.

    The fingerprint is taken from the uint8 content before any resizing, so it names
    the source data rather than a derived view of it.

    Args:
        images: uint8 ``[N, C, H, W]`` (square).
        labels: Integer ``[N]`` in ``[0, num_classes)``.
        name: Data set name.
        split: Split name.
        num_classes: Number of classes.
        class_names: Optional class names.
        resolution: Optional target side length; resized if it differs from native.
        source: What to name in error messages (a path); defaults to ``name``.
        holdout, holdout_seed, test_root: How the split was drawn (see :class:`ImageDataset`).
        fingerprint_extra: Passed to :func:`content_fingerprint` as ``extra``.
        digests: The examples' :func:`example_digests` when ``images`` were already resized
            (an image folder read at a resolution); by default they are taken of ``images``.
    """
    where = source or name
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DatasetError(f"{where}: expected uint8 [N, C, H, W] images, got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise DatasetError(f"{where}: no images")
    if images.shape[2] != images.shape[3]:
        raise DatasetError(f"{where}: images are {images.shape[2]}x{images.shape[3]}; expected square images")
    _check_resolution(resolution)
    labels = np.asarray(labels, dtype=np.int64)
    fingerprint = content_fingerprint(images, labels, name=name, split=split, extra=fingerprint_extra)
    if digests is None:
        digests = example_digests(images)
    x = torch.from_numpy(np.array(images, dtype=np.float32, order="C")) / 127.5 - 1.0
    if resolution is not None:
        x = resize_images(x, resolution)
    return ImageDataset(
        images=x,
        labels=torch.from_numpy(labels.copy()),
        num_classes=num_classes,
        name=name,
        split=split,
        fingerprint=fingerprint,
        class_names=class_names,
        holdout=holdout,
        holdout_seed=holdout_seed,
        test_root=test_root,
        example_digests=digests,
    )
