"""CIFAR-10 python-version reader, on a tiny fake tarball written to tmp_path."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from privdiff.data import DatasetError, load_dataset

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 4


def _batch(rng: np.random.Generator, n: int) -> dict:
    return {
        b"batch_label": b"fake",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
        b"filenames": [b"x.png"] * n,
    }


def _make_cifar(root: Path, *, tarball: bool = True, meta: bool = True, seed: int = 0) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    files = {f"data_batch_{i}": _batch(rng, PER_BATCH) for i in range(1, 6)}
    files["test_batch"] = _batch(rng, 3)
    payloads = {name: pickle.dumps(obj) for name, obj in files.items()}
    if meta:
        payloads["batches.meta"] = pickle.dumps({b"label_names": [n.encode() for n in NAMES], b"num_vis": 3072})
    root.mkdir(parents=True, exist_ok=True)
    if tarball:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            for name, data in payloads.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        folder = root / "cifar-10-batches-py"
        folder.mkdir()
        for name, data in payloads.items():
            (folder / name).write_bytes(data)
    return files


def _as_uint8(images) -> np.ndarray:
    return ((images + 1) * 127.5).round().numpy().astype(np.uint8)


@pytest.mark.parametrize("tarball", [True, False])
def test_read_train_and_test(tmp_path, tarball):
    files = _make_cifar(tmp_path, tarball=tarball)
    train = load_dataset("cifar10", root=tmp_path)
    assert train.images.shape == (5 * PER_BATCH, 3, 32, 32) and train.channels == 3 and train.resolution == 32
    expected = np.concatenate([files[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    np.testing.assert_array_equal(_as_uint8(train.images).reshape(-1, 3072), expected)
    labels = sum((files[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert train.labels.tolist() == labels
    assert train.class_names == tuple(NAMES)

    test = load_dataset("cifar10", root=tmp_path, split="test")
    assert len(test) == 3 and test.labels.tolist() == files["test_batch"][b"labels"]
    assert len(load_dataset("cifar10", root=tmp_path, split="all")) == 5 * PER_BATCH + 3
    assert test.fingerprint != train.fingerprint


def test_channel_order(tmp_path):
    files = _make_cifar(tmp_path)
    row = files["data_batch_1"][b"data"][0]
    image = _as_uint8(load_dataset("cifar10", root=tmp_path).images[0])
    # Row layout: 1024 red values, then 1024 green, then 1024 blue, each row-major 32×32.
    np.testing.assert_array_equal(image[0], row[:1024].reshape(32, 32))
    np.testing.assert_array_equal(image[1], row[1024:2048].reshape(32, 32))
    np.testing.assert_array_equal(image[2], row[2048:].reshape(32, 32))
    assert image[0, 0, 1] == row[1] and image[0, 1, 0] == row[32]


def test_tarball_and_folder_agree_and_resize(tmp_path):
    _make_cifar(tmp_path / "t", tarball=True, seed=5)
    _make_cifar(tmp_path / "f", tarball=False, seed=5, meta=False)
    a = load_dataset("cifar10", root=tmp_path / "t")
    b = load_dataset("cifar10", root=tmp_path / "f", resolution=16)
    assert a.fingerprint == b.fingerprint
    assert b.images.shape == (5 * PER_BATCH, 3, 16, 16) and b.class_names is None


def test_missing_batch_and_root(tmp_path):
    with pytest.raises(DatasetError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", root=tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("cifar10", root=tmp_path / "missing")
    _make_cifar(tmp_path, tarball=False)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_dataset("cifar10", root=tmp_path)
    assert len(load_dataset("cifar10", root=tmp_path, split="test")) == 3


def test_bad_shapes(tmp_path):
    _make_cifar(tmp_path, tarball=False)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((3, 3000), np.uint8), b"labels": [0, 1, 2]}))
    with pytest.raises(DatasetError, match="3072") as info:
        load_dataset("cifar10", root=tmp_path, split="test")
    assert "test_batch" in str(info.value)
    path.write_bytes(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DatasetError, match="labels"):
        load_dataset("cifar10", root=tmp_path, split="test")
    path.write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset("cifar10", root=tmp_path, split="test")
