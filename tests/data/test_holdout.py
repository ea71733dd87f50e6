"""Test splits for image folders (``holdout`` / ``test_root``), on fresh random PNG folders and zips in tmp_path."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from privdiff.data import DatasetError, ImageDataset, absolute_root, load_dataset
from privdiff.data.splits import holdout_indices

CLASSES = {"tulip": 8, "daisy": 10, "rose": 9}  # written in this (unsorted) order


def _make_folder(
    root: Path, rng: np.random.Generator, *, classes: dict[str, int] = CLASSES, mode: str = "RGB", size: int = 4
) -> None:
    """One sub-folder per class of random (hence distinct) PNGs."""
    for cls, count in classes.items():
        (root / cls).mkdir(parents=True)
        for i in range(count):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode).save(root / cls / f"{i}.png")


def _zip(folder: Path, path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted(folder.rglob("*.png")):
            zf.write(file, "wrapped/" + file.relative_to(folder).as_posix())
    return path


def _keys(ds: ImageDataset) -> list[bytes]:
    """Each image's exact uint8 content and label, as a hashable key."""
    u8 = np.rint((ds.images.numpy() + 1) * 127.5).astype(np.uint8)
    return [u8[i].tobytes() + bytes([int(ds.labels[i])]) for i in range(len(ds))]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng()


@pytest.fixture
def folder(tmp_path: Path, rng: np.random.Generator) -> Path:
    _make_folder(tmp_path / "flowers", rng)
    return tmp_path / "flowers"


def test_holdout_parts_disjoint_cover_stratified_and_deterministic(folder, tmp_path, rng):
    seed, fraction = int(rng.integers(0, 2**31)), float(rng.uniform(0.2, 0.45))
    kw = dict(root=folder, holdout=fraction, holdout_seed=seed)
    train, test, whole = (load_dataset("folder", split=s, **kw) for s in ("train", "test", "all"))
    assert set(_keys(train)).isdisjoint(_keys(test))
    assert sorted(_keys(train) + _keys(test)) == sorted(_keys(whole))
    assert len(set(_keys(whole))) == len(whole) == sum(CLASSES.values())
    assert train.class_names == test.class_names == whole.class_names == ("daisy", "rose", "tulip")
    for c, name in enumerate(whole.class_names):  # stratified: every class on both sides, about `fraction` held out
        n_test = int((test.labels == c).sum())
        assert n_test == int(np.floor(fraction * CLASSES[name] + 0.5))
        assert n_test + int((train.labels == c).sum()) == CLASSES[name]
    for ds in (train, test, whole):
        assert (ds.holdout, ds.holdout_seed, ds.test_root) == (fraction, seed, None)
        assert ds.split_identity == {"split": ds.split, "holdout": fraction, "holdout_seed": seed}
        assert ds.channels == 3
    again = load_dataset("folder", split="test", **kw)
    assert _keys(again) == _keys(test) and again.fingerprint == test.fingerprint
    # the same images as a zip (wrapped in one folder) are the same data and the same parts
    zipped = _zip(folder, tmp_path / "flowers.zip")
    for ds in (train, test, whole):
        z = load_dataset("folder", root=zipped, split=ds.split, holdout=fraction, holdout_seed=seed)
        assert z.fingerprint == ds.fingerprint and _keys(z) == _keys(ds)
    other = load_dataset("folder", split="test", root=zipped, holdout=fraction, holdout_seed=seed + 1)
    assert _keys(other) != _keys(test)


def test_holdout_fingerprints_name_the_part_fraction_and_seed(folder, rng):
    seed = int(rng.integers(0, 2**31))
    plain = {s: load_dataset("folder", root=folder, split=s).fingerprint for s in ("train", "all")}
    fp = {
        (s, f, k): load_dataset("folder", root=folder, split=s, holdout=f, holdout_seed=k).fingerprint
        for s in ("train", "test")
        for f in (0.25, 0.4)
        for k in (seed, seed + 1)
    }
    assert len(set(fp.values()) | set(plain.values())) == len(fp) + len(plain)
    # "all" is the whole folder whatever the split options: same content, same fingerprint
    assert load_dataset("folder", root=folder, split="all", holdout=0.25, holdout_seed=seed).fingerprint == plain["all"]


def test_holdout_indices_partition_labels(rng):
    labels = rng.integers(0, 5, size=200)
    labels[:5] = np.arange(5)  # every class present
    seed = int(rng.integers(0, 2**31))
    train, test = holdout_indices(labels, fraction=0.2, seed=seed)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(200))
    assert set(np.unique(labels[train])) == set(np.unique(labels[test])) == set(range(5))
    t2, s2 = holdout_indices(labels, fraction=0.2, seed=seed)
    assert np.array_equal(t2, train) and np.array_equal(s2, test)
    single = holdout_indices(np.array([0, 1, 1, 1]), fraction=0.3, seed=seed)  # a lone example stays in train
    assert 0 in single[0] and len(single[1]) == 1


def test_test_root_reads_another_folder(tmp_path, rng):
    _make_folder(tmp_path / "train", rng, mode="RGB")
    _make_folder(tmp_path / "test", rng, classes={"rose": 3, "daisy": 2}, mode="L")  # a subset of the classes, gray
    kw = dict(root=tmp_path / "train", test_root=tmp_path / "test")
    train, test, whole = (load_dataset("folder", split=s, **kw) for s in ("train", "test", "all"))
    assert train.fingerprint == load_dataset("folder", root=tmp_path / "train", split="train").fingerprint
    assert len(test) == 5 and test.channels == 3  # gray test images promoted to the training set's RGB
    assert test.class_names == train.class_names == ("daisy", "rose", "tulip")
    assert sorted(test.labels.tolist()) == [0, 0, 1, 1, 1]  # labels follow the class names, not the folder order
    assert _keys(whole) == _keys(train) + _keys(test)
    assert len({train.fingerprint, test.fingerprint, whole.fingerprint}) == 3
    assert test.test_root == str(tmp_path / "test") and test.holdout is None
    assert test.split_identity == {"split": "test", "test_root": str(tmp_path / "test")}
    zipped = load_dataset(
        "folder", split="test", root=tmp_path / "train", test_root=_zip(tmp_path / "test", tmp_path / "t.zip")
    )
    assert _keys(zipped) == _keys(test)


def test_root_with_tilde_or_relative_is_made_absolute(tmp_path, rng, monkeypatch):
    _make_folder(tmp_path / "home" / "imgs", rng, classes={"a": 3, "b": 3})
    _make_folder(tmp_path / "home" / "more", rng, classes={"b": 2})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "home" / "imgs")
    ds = load_dataset("folder", root="~/imgs", split="test", test_root="../more")
    assert ds.test_root == str(tmp_path / "home" / "more") and len(ds) == 2
    assert absolute_root("~/imgs") == str(tmp_path / "home" / "imgs") and absolute_root(None) is None
    assert absolute_root(".") == str(tmp_path / "home" / "imgs")


def test_refusals(folder, tmp_path, rng):
    with pytest.raises(DatasetError, match=r"data\.holdout.*data\.test_root") as err:
        load_dataset("folder", root=folder, split="test")
    assert "split=" not in str(err.value) and "\n" not in str(err.value)
    for name in ("digits", "mnist5k", "mnist", "cifar10"):
        with pytest.raises(DatasetError, match="has a test split of its own"):
            load_dataset(name, root=tmp_path, holdout=0.1)
        with pytest.raises(DatasetError, match="has a test split of its own"):
            load_dataset(name, root=tmp_path, test_root=folder)
    for bad in (0, 1, 1.5, -0.1, True, "0.1"):
        with pytest.raises(DatasetError, match="data.holdout must be a fraction"):
            load_dataset("folder", root=folder, holdout=bad)
    for bad in (-1, 0.5, True):
        with pytest.raises(DatasetError, match="data.holdout_seed"):
            load_dataset("folder", root=folder, holdout=0.1, holdout_seed=bad)
    with pytest.raises(DatasetError, match="not both"):
        load_dataset("folder", root=folder, holdout=0.1, test_root=folder)
    with pytest.raises(DatasetError, match="is data.root"):
        load_dataset("folder", root=folder, split="test", test_root=folder)
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("folder", root=folder, split="train", test_root=tmp_path / "missing")
    _make_folder(tmp_path / "alien", rng, classes={"cactus": 2})
    with pytest.raises(DatasetError, match="'cactus' is not a class"):
        load_dataset("folder", root=folder, split="test", test_root=tmp_path / "alien")
    _make_folder(tmp_path / "big", rng, classes={"rose": 2}, size=6)
    with pytest.raises(DatasetError, match="data.resolution"):
        load_dataset("folder", root=folder, split="test", test_root=tmp_path / "big")
    assert load_dataset("folder", root=folder, split="test", test_root=tmp_path / "big", resolution=5).resolution == 5
    _make_folder(tmp_path / "gray", rng, classes={"rose": 3}, mode="L")
    _make_folder(tmp_path / "colour", rng, classes={"rose": 2}, mode="RGB")
    with pytest.raises(DatasetError, match="colour test images"):
        load_dataset("folder", root=tmp_path / "gray", split="test", test_root=tmp_path / "colour")
    _make_folder(tmp_path / "lonely", rng, classes={"a": 1, "b": 1})
    with pytest.raises(DatasetError, match="single image"):
        load_dataset("folder", root=tmp_path / "lonely", split="train", holdout=0.5)


def test_dataset_refuses_inconsistent_split_fields(folder):
    ds = load_dataset("folder", root=folder, split="train", holdout=0.3, holdout_seed=1)
    fields = dict(
        images=ds.images,
        labels=ds.labels,
        num_classes=ds.num_classes,
        name="folder",
        split="train",
        fingerprint=ds.fingerprint,
    )
    with pytest.raises(DatasetError, match="holdout_seed without holdout"):
        ImageDataset(**fields, holdout_seed=1)
    with pytest.raises(DatasetError, match="needs holdout_seed"):
        ImageDataset(**fields, holdout=0.3)
