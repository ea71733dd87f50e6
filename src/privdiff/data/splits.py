"""Train/test splits for data that has none of its own (an image folder or a zip of one).

Evaluation and membership attacks need real images that were never trained on. Built-in
sets, IDX and CIFAR-10 ship such a test split; a user's folder does not, so it gets one
in one of two ways (recipe keys ``data.holdout`` / ``data.holdout_seed`` / ``data.test_root``):

* ``holdout=f``: a fraction ``f`` of the images, drawn once per class from ``holdout_seed``
  (:func:`holdout_indices`), is the test split and is never trained on; ``split="train"``
  is the rest. The draw depends only on the labels, ``f`` and the seed, so every command
  of a run sees the same parts.
* ``test_root=DIR``: another folder or zip (same classes, or a subset of them) is the test
  split; ``split="train"`` is all of ``root``.

The fingerprint of a held-out part names ``f`` and the seed as well as its content, so the
ledger's data identity says exactly what was trained on.
"""

from __future__ import annotations

import os
import numpy as np

from privdiff.data.dataset import DatasetError, ImageDataset, _check_split, _to_dataset
from privdiff.data.files import _require_root, load_folder, read_folder

__all__ = ["NO_TEST_SPLIT", "absolute_root", "check_split_options", "holdout_indices", "load_folder_split"]

NO_TEST_SPLIT: tuple[str, ...] = ("folder",)
"""Data sets without a test split of their own: the only ones that take ``holdout`` / ``test_root``."""

_FOLDER_EXPECTED = "a directory with one sub-folder per class, or a .zip of one"


def absolute_root(root: str | os.PathLike | None) -> str | None:
    """``root`` with ``~`` expanded and made absolute (None stays None), so later commands work from any directory."""
    if root is None:
        return None
    return os.path.abspath(os.path.expanduser(os.fspath(root)))


def check_split_options(
    name: str,
    *,
    holdout: float | None,
    holdout_seed: int,
    test_root: str | os.PathLike | None,
) -> None:
    """Refuse split options that are malformed or that ``name`` cannot take, with a one-line error.

    Raises:
        DatasetError: ``holdout`` not a number in (0, 1), ``holdout_seed`` not an int >= 0,
            both ``holdout`` and ``test_root`` given, or either given for a data set that
            has a test split of its own.
    """
    if isinstance(holdout_seed, bool) or not isinstance(holdout_seed, (int, np.integer)) or holdout_seed < 0:
        raise DatasetError(f"data.holdout_seed must be an int >= 0, got {holdout_seed!r}")
    if holdout is None and test_root is None:
        return
    if name not in NO_TEST_SPLIT:
        raise DatasetError(
            f"{name} has a test split of its own; data.holdout and data.test_root apply only to data without one "
            f"({', '.join(NO_TEST_SPLIT)})"
        )
    if holdout is not None and test_root is not None:
        raise DatasetError("give data.holdout or data.test_root, not both")
    if holdout is not None and (
        isinstance(holdout, bool) or not isinstance(holdout, (int, float, np.floating)) or not 0 < holdout < 1
    ):
        raise DatasetError(f"data.holdout must be a fraction strictly between 0 and 1, got {holdout!r}")


def holdout_indices(labels: np.ndarray, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw a held-out fraction of examples, per class, so that each class keeps members on both sides.

    For each class in increasing order, one ``numpy.random.default_rng(seed)`` permutes the
    class's indices and the first ``round(fraction * n_c)`` (at least 1 and at most
    ``n_c - 1``) are held out; a class with a single example stays on the training side.
    The result depends only on the labels, ``fraction`` and ``seed``.

    Args:
        labels: Integer class labels ``[N]``.
        fraction: Held-out fraction, in (0, 1).
        seed: Seed of the draw, >= 0.

    Returns:
        ``(train, test)``: disjoint sorted int64 index arrays whose union is ``range(N)``.

    Raises:
        DatasetError: The draw would leave the test split empty (every class has one example).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, int(np.floor(fraction * len(idx) + 0.5))))
        test.append(idx[:k])
        train.append(idx[k:])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64) if test else np.zeros(0, np.int64)
    if test_idx.size == 0:
        raise DatasetError(
            f"data.holdout={fraction}: no image can be held out of {len(labels)} (every class has a single image)"
        )
    return np.sort(np.concatenate(train)).astype(np.int64), test_idx


def load_folder_split(
    root: str | os.PathLike | None,
    *,
    split: str,
    resolution: int | None = None,
    holdout: float | None = None,
    holdout_seed: int = 0,
    test_root: str | os.PathLike | None = None,
) -> ImageDataset:
    """One split of an image folder (or zip) made with ``holdout`` or ``test_root``.

    Args:
        root: The folder or ``.zip`` with one sub-folder per class.
        split: ``"train"`` (what is trained on), ``"test"`` (the held-out fraction or
            ``test_root``) or ``"all"`` (both; with ``holdout``, the whole folder in its own
            order and with its plain fingerprint).
        resolution: Optional side length every image is resized to.
        holdout: Fraction held out as the test split (see :func:`holdout_indices`).
        holdout_seed: Seed of the held-out draw.
        test_root: Folder or ``.zip`` read as the test split instead.

    Raises:
        DatasetError: Bad options (see :func:`check_split_options`), or a test folder whose
            classes, size or channels do not fit the training folder.
    """
    _check_split("folder", split)
    check_split_options("folder", holdout=holdout, holdout_seed=holdout_seed, test_root=test_root)
    if holdout is not None:
        return _held_out(root, split=split, resolution=resolution, fraction=float(holdout), seed=int(holdout_seed))
    if test_root is not None:
        return _with_test_root(root, split=split, resolution=resolution, test_root=test_root)
    return load_folder(root, split=split, resolution=resolution)  # neither: the whole folder, no test split


def _held_out(
    root: str | os.PathLike | None, *, split: str, resolution: int | None, fraction: float, seed: int
) -> ImageDataset:
    """The ``split`` part of a folder with a seeded held-out fraction as its test split."""
    content = read_folder(root, resolution=resolution)
    train, test = holdout_indices(content.labels, fraction=fraction, seed=seed)
    idx = {"train": train, "test": test, "all": np.arange(len(content.labels))}[split]
    extra = None if split == "all" else {"holdout": fraction, "holdout_seed": seed}
    return _to_dataset(
        content.images[idx],
        content.labels[idx],
        name="folder",
        split=split,
        num_classes=len(content.class_names),
        class_names=content.class_names,
        source=str(content.path),
        holdout=fraction,
        holdout_seed=seed,
        fingerprint_extra=extra,
        digests=content.digests[idx],
    )


def _with_test_root(
    root: str | os.PathLike | None, *, split: str, resolution: int | None, test_root: str | os.PathLike
) -> ImageDataset:
    """The ``split`` part of a folder whose test split is another folder or zip."""
    test_path = _require_root(test_root, "folder", f"data.test_root: {_FOLDER_EXPECTED}").absolute()
    train = read_folder(root, resolution=resolution)
    if test_path.resolve() == train.path.resolve():
        raise DatasetError(f"{test_path}: data.test_root is data.root; the test split must be other images")
    common = dict(
        name="folder",
        num_classes=len(train.class_names),
        class_names=train.class_names,
        source=str(train.path),
        test_root=str(test_path),
    )
    if split == "train":  # the test folder is only checked to exist here: training never reads it
        return _to_dataset(train.images, train.labels, split="train", digests=train.digests, **common)
    test = read_folder(test_path, resolution=resolution)
    unknown = sorted(set(test.class_names) - set(train.class_names))
    if unknown:
        raise DatasetError(
            f"{test_path}: class folder {unknown[0]!r} is not a class of {train.path} ({', '.join(train.class_names)})"
        )
    if test.images.shape[2:] != train.images.shape[2:]:
        raise DatasetError(
            f"{test_path}: images are {test.images.shape[2]}x{test.images.shape[3]}, those of {train.path} "
            f"{train.images.shape[2]}x{train.images.shape[3]}; set data.resolution to resize both"
        )
    images = test.images
    if images.shape[1] != train.images.shape[1]:
        if images.shape[1] == 3:
            raise DatasetError(f"{test_path}: colour test images for the grayscale images of {train.path}")
        images = np.repeat(images, 3, axis=1)  # exactly PIL's L -> RGB
    relabel = np.array([train.class_names.index(c) for c in test.class_names], dtype=np.int64)
    labels = relabel[test.labels]
    if split == "test":
        return _to_dataset(images, labels, split="test", digests=test.digests, **{**common, "source": str(test_path)})
    return _to_dataset(
        np.concatenate([train.images, images]),
        np.concatenate([train.labels, labels]),
        split="all",
        digests=np.concatenate([train.digests, test.digests]),
        **common,
    )
