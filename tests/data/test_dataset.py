"""The container, the fingerprint, resizing and argument errors."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from privdiff.data import DATASETS, DatasetError, ImageDataset, content_fingerprint, load_dataset
from privdiff.data.dataset import _to_dataset, resize_images


def _content(seed: int = 0, n: int = 6, c: int = 1, size: int = 8):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, c, size, size), dtype=np.uint8)
    labels = rng.integers(0, 3, size=n).astype(np.int64)
    return images, labels


def test_fingerprint_pinned_value():
    # Pinned so an accidental change of the byte layout (which would orphan ledger entries) fails.
    images = np.arange(2 * 1 * 2 * 2, dtype=np.uint8).reshape(2, 1, 2, 2)
    labels = np.array([0, 1])
    pinned = "sha256:25bc86d6519d58c55a11e762b5ab40f275568b9ccc770379ca1ec9943cebcc54"
    assert content_fingerprint(images, labels, name="toy", split="train") == pinned
    # The documented layout, spelled out: pixels, int64 LE labels, then the JSON metadata.
    payload = bytes(range(8)) + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
    payload += b'{"name":"toy","shape":[2,1,2,2],"split":"train","v":1}'
    assert pinned == "sha256:" + hashlib.sha256(payload).hexdigest()


def test_fingerprint_changes_with_one_pixel_label_name_or_split():
    images, labels = _content()
    base = _to_dataset(images, labels, name="toy", split="train", num_classes=3)
    same = _to_dataset(images.copy(), labels.copy(), name="toy", split="train", num_classes=3)
    assert same.fingerprint == base.fingerprint

    pixel = images.copy()
    pixel[3, 0, 5, 2] ^= 1
    assert _to_dataset(pixel, labels, name="toy", split="train", num_classes=3).fingerprint != base.fingerprint

    label = labels.copy()
    label[0] = (label[0] + 1) % 3
    assert _to_dataset(images, label, name="toy", split="train", num_classes=3).fingerprint != base.fingerprint

    assert _to_dataset(images, labels, name="toy2", split="train", num_classes=3).fingerprint != base.fingerprint
    assert _to_dataset(images, labels, name="toy", split="all", num_classes=3).fingerprint != base.fingerprint
    # Same bytes, different shape.
    reshaped = images.reshape(6, 4, 4, 4)
    assert content_fingerprint(reshaped, labels, name="toy", split="train") != base.fingerprint


def test_fingerprint_ignores_label_dtype_and_memory_layout():
    images, labels = _content()
    a = content_fingerprint(images, labels.astype(np.int32), name="t", split="train")
    b = content_fingerprint(np.asfortranarray(images), labels.astype(">i8"), name="t", split="train")
    assert a == b


def test_scaling_is_exact():
    images = np.array([0, 1, 127, 128, 254, 255], dtype=np.uint8).reshape(6, 1, 1, 1).repeat(2, 2).repeat(2, 3)
    ds = _to_dataset(images, np.zeros(6), name="t", split="all", num_classes=1)
    expected = torch.tensor([0, 1, 127, 128, 254, 255], dtype=torch.float32) / 127.5 - 1
    assert torch.equal(ds.images[:, 0, 0, 0], expected)
    assert ds.images[0].min().item() == -1.0 and ds.images[-1].max().item() == 1.0


def test_resize_matches_interpolate_and_clamps():
    images, labels = _content(size=16)
    ds = _to_dataset(images, labels, name="t", split="train", num_classes=3, resolution=7)
    native = torch.from_numpy(images.astype(np.float32)) / 127.5 - 1
    expected = torch.nn.functional.interpolate(
        native, size=(7, 7), mode="bilinear", antialias=True, align_corners=False
    ).clamp(-1, 1)
    assert ds.images.shape == (6, 1, 7, 7)
    torch.testing.assert_close(ds.images, expected)
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    up = resize_images(native, 40, chunk=4)  # chunked path
    assert up.shape == (6, 1, 40, 40) and up.min() >= -1 and up.max() <= 1


def test_non_square_rejected():
    with pytest.raises(DatasetError, match="square"):
        _to_dataset(np.zeros((2, 1, 4, 5), np.uint8), np.zeros(2), name="t", split="train", num_classes=1)
    with pytest.raises(DatasetError, match="square"):
        resize_images(torch.zeros(1, 1, 4, 5), 8)


def test_container_validates_fields():
    good = dict(
        images=torch.zeros(2, 1, 4, 4),
        labels=torch.zeros(2, dtype=torch.long),
        num_classes=2,
        name="t",
        split="train",
        fingerprint="sha256:00",
    )
    ds = ImageDataset(**good)
    assert len(ds) == 2 and ds.resolution == 4 and ds.channels == 1
    with pytest.raises(AttributeError):
        ds.name = "other"  # frozen
    for change in (
        {"labels": torch.tensor([0, 2])},
        {"labels": torch.zeros(3, dtype=torch.long)},
        {"images": torch.zeros(2, 1, 4, 4, dtype=torch.float64)},
        {"split": "val"},
        {"fingerprint": "md5:00"},
        {"class_names": ("a",)},
    ):
        with pytest.raises(DatasetError):
            ImageDataset(**{**good, **change})


def test_unknown_name_split_resolution():
    with pytest.raises(DatasetError) as info:
        load_dataset("imagenet")
    message = str(info.value)
    assert "imagenet" in message and all(name in message for name in DATASETS) and "\n" not in message
    with pytest.raises(DatasetError, match="split"):
        load_dataset("digits", split="validation")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(DatasetError, match="resolution"):
            load_dataset("digits", resolution=bad)


def test_file_datasets_need_root():
    for name in ("mnist", "fashion-mnist", "cifar10", "folder"):
        with pytest.raises(DatasetError, match="root"):
            load_dataset(name)
