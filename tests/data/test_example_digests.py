"""Per-example digests: the same images as IDX, a PNG folder, a zip or in memory have the same digests."""

from __future__ import annotations

import numpy as np
import pytest

from privdiff.data import load_dataset
from privdiff.data.dataset import example_digests
from privdiff.data.membership import subset
from tests.helpers import random_digits, write_folder, write_idx, write_zip


def _set(ds) -> set[bytes]:
    return {row.tobytes() for row in ds.example_digests}


def test_idx_folder_zip_and_memory_name_the_same_examples(tmp_path):
    images, labels = random_digits(np.random.default_rng(11), 30)
    idx = load_dataset("mnist", root=write_idx(tmp_path / "idx", images, labels))
    folder = write_folder(tmp_path / "pngs", images, labels)
    png = load_dataset("folder", root=folder)
    zipped = load_dataset("folder", root=write_zip(folder, tmp_path / "pngs.zip"))
    rgb = load_dataset("folder", root=write_folder(tmp_path / "rgb", images, labels, mode="RGB"))
    resized = load_dataset("folder", root=folder, resolution=8)  # digests are of the pixels before resizing
    direct = example_digests(images[:, None])
    assert idx.fingerprint != png.fingerprint  # the file sets differ ...
    assert _set(idx) == _set(png) == _set(zipped) == _set(rgb) == _set(resized) == {r.tobytes() for r in direct}
    assert rgb.channels == 3 and resized.resolution == 8  # ... the examples do not
    assert len(_set(idx)) == 30


def test_a_digest_is_of_the_pixels_only(tmp_path):
    rng = np.random.default_rng(12)
    images = rng.integers(0, 256, size=(4, 1, 6, 6), dtype=np.uint8)
    d = example_digests(images)
    assert d.shape == (4, 32) and d.dtype == np.uint8 and len({r.tobytes() for r in d}) == 4
    np.testing.assert_array_equal(example_digests(images[::-1]), d[::-1])  # position is not part of it
    np.testing.assert_array_equal(example_digests(np.repeat(images, 3, axis=1)), d)  # gray as RGB
    changed = images.copy()
    changed[2, 0, 3, 3] ^= 1  # one pixel
    assert (example_digests(changed)[2] != d[2]).any() and (example_digests(changed)[[0, 1, 3]] == d[[0, 1, 3]]).all()
    colour = rng.integers(0, 256, size=(2, 3, 6, 6), dtype=np.uint8)
    assert not (example_digests(colour)[0] == example_digests(colour[:, :1])[0]).all()  # colour is not its red plane
    assert not (example_digests(images[:, :, :3, :3])[0] == d[0]).all()  # nor a crop


def test_subsets_and_held_out_splits_keep_their_examples(tmp_path):
    images, labels = random_digits(np.random.default_rng(13), 40)
    folder = write_folder(tmp_path / "pngs", images, labels)
    whole = load_dataset("folder", root=folder)
    train = load_dataset("folder", root=folder, holdout=0.25, holdout_seed=3)
    test = load_dataset("folder", root=folder, split="test", holdout=0.25, holdout_seed=3)
    assert _set(train) | _set(test) == _set(whole) and not _set(train) & _set(test)
    part = subset(whole, np.array([3, 1, 4]))
    np.testing.assert_array_equal(part.example_digests, whole.example_digests[[3, 1, 4]])


def test_builtin_mnist5k_and_its_png_export_agree(tmp_path):
    ds = load_dataset("mnist5k", split="train")
    pixels = ((ds.images[:12] + 1) * 127.5).round().byte().numpy()[:, 0]
    exported = load_dataset("folder", root=write_folder(tmp_path / "export", pixels, ds.labels[:12].numpy()))
    assert _set(exported) <= _set(ds)


def test_digests_must_match_the_images():
    from privdiff.data import DatasetError, ImageDataset
    import torch

    x = torch.rand(3, 1, 4, 4) * 2 - 1
    with pytest.raises(DatasetError, match="example_digests must be uint8"):
        ImageDataset(
            images=x,
            labels=torch.randint(0, 1, (3,)),
            num_classes=1,
            name="x",
            split="train",
            fingerprint="sha256:0",
            example_digests=np.random.default_rng(14).integers(0, 256, size=(2, 32), dtype=np.uint8),
        )
