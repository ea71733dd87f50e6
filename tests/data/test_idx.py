"""MNIST / Fashion-MNIST IDX reader, on fixtures written to tmp_path."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from privdiff.data import DatasetError, load_dataset

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x0800 | array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def _write(path: Path, data: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def _make_idx(folder: Path, *, gz: bool = False, n_train: int = 12, n_test: int = 5, seed: int = 0):
    """Write fresh random IDX files; return {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    content = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write(folder / FILES[split][0], _idx_bytes(images), gz)
        _write(folder / FILES[split][1], _idx_bytes(labels), gz)
        content[split] = (images, labels)
    return content


def _as_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images + 1) * 127.5).round().to(torch.uint8).numpy()


@pytest.mark.parametrize("gz", [False, True])
def test_roundtrip_exact(tmp_path, gz):
    content = _make_idx(tmp_path, gz=gz)
    for split in ("train", "test"):
        ds = load_dataset("mnist", root=tmp_path, split=split)
        images, labels = content[split]
        assert ds.images.shape == (len(images), 1, 28, 28)
        np.testing.assert_array_equal(_as_uint8(ds.images)[:, 0], images)
        np.testing.assert_array_equal(ds.labels.numpy(), labels.astype(np.int64))
        assert ds.name == "mnist" and ds.split == split and ds.class_names[3] == "3"
    both = load_dataset("mnist", root=tmp_path, split="all")
    assert len(both) == 17
    np.testing.assert_array_equal(_as_uint8(both.images[12:])[:, 0], content["test"][0])


def test_plain_and_gz_give_same_fingerprint(tmp_path):
    _make_idx(tmp_path / "plain", gz=False, seed=3)
    _make_idx(tmp_path / "gz", gz=True, seed=3)
    a = load_dataset("mnist", root=tmp_path / "plain")
    b = load_dataset("mnist", root=tmp_path / "gz")
    assert a.fingerprint == b.fingerprint
    assert load_dataset("mnist", root=tmp_path / "plain").fingerprint == a.fingerprint


def test_one_pixel_changes_fingerprint(tmp_path):
    content = _make_idx(tmp_path / "a", seed=4)
    before = load_dataset("mnist", root=tmp_path / "a").fingerprint
    images, labels = content["train"]
    images = images.copy()
    images[7, 13, 21] ^= 0x40
    (tmp_path / "a" / FILES["train"][0]).write_bytes(_idx_bytes(images))
    assert load_dataset("mnist", root=tmp_path / "a").fingerprint != before


def test_raw_subfolder_and_fashion_names(tmp_path):
    _make_idx(tmp_path / "raw", gz=True)
    ds = load_dataset("fashion-mnist", root=tmp_path, split="test")
    assert len(ds) == 5 and ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert ds.fingerprint != load_dataset("mnist", root=tmp_path, split="test").fingerprint


def test_resolution(tmp_path):
    _make_idx(tmp_path)
    ds = load_dataset("mnist", root=tmp_path, resolution=32)
    assert ds.images.shape == (12, 1, 32, 32) and ds.images.min() >= -1 and ds.images.max() <= 1


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_file(tmp_path, gz):
    _make_idx(tmp_path, gz=gz)
    name = FILES["train"][0] + (".gz" if gz else "")
    path = tmp_path / name
    data = path.read_bytes()
    if gz:
        data = gzip.compress(gzip.decompress(data)[:-100])
    else:
        data = data[:-100]
    path.write_bytes(data)
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist", root=tmp_path)
    message = str(info.value)
    assert name in message and "\n" not in message
    assert str(12 * 28 * 28) in message and str(12 * 28 * 28 - 100) in message


def test_corrupt_gzip_names_file(tmp_path):
    _make_idx(tmp_path, gz=True)
    path = tmp_path / (FILES["train"][1] + ".gz")
    path.write_bytes(path.read_bytes()[:15])
    with pytest.raises(DatasetError, match=FILES["train"][1]):
        load_dataset("mnist", root=tmp_path)


def test_wrong_magic(tmp_path):
    _make_idx(tmp_path)
    # Swap: a label file where the image file should be.
    images_path = tmp_path / FILES["train"][0]
    images_path.write_bytes((tmp_path / FILES["train"][1]).read_bytes())
    with pytest.raises(DatasetError, match="magic") as info:
        load_dataset("mnist", root=tmp_path)
    assert FILES["train"][0] in str(info.value)


def test_count_mismatch(tmp_path):
    _make_idx(tmp_path)
    labels = np.zeros(11, dtype=np.uint8)
    (tmp_path / FILES["train"][1]).write_bytes(_idx_bytes(labels))
    with pytest.raises(DatasetError, match="12 images") as info:
        load_dataset("mnist", root=tmp_path)
    assert "11 labels" in str(info.value)


def test_label_out_of_range(tmp_path):
    _make_idx(tmp_path)
    labels = np.full(12, 10, dtype=np.uint8)
    (tmp_path / FILES["train"][1]).write_bytes(_idx_bytes(labels))
    with pytest.raises(DatasetError, match="label 10"):
        load_dataset("mnist", root=tmp_path)


def test_missing_dir_and_file(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("mnist", root=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as info:
        load_dataset("fashion-mnist", root=tmp_path / "empty", split="test")
    message = str(info.value)
    assert "not found" in message and "t10k-images-idx3-ubyte[.gz]" in message and "Fashion-MNIST" in message
