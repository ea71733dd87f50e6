"""Image-folder reader (directory or zip of class sub-folders), on PNGs in tmp_path."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from privdiff.data import DatasetError, load_dataset


def _make_folder(root: Path, *, mode: str = "L", size: int = 6, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Write 3 class folders (deliberately created out of order) of random PNGs."""
    rng = np.random.default_rng(seed)
    content = {}
    for cls, count in (("zebra", 2), ("ant", 3), ("moth", 1)):
        (root / cls).mkdir(parents=True)
        arrays = []
        for i in range(count):
            shape = (size, size) if mode == "L" else (size, size, 3)
            array = rng.integers(0, 256, size=shape, dtype=np.uint8)
            Image.fromarray(array, mode=mode).save(root / cls / f"img{i}.png")
            arrays.append(array)
        content[cls] = arrays
    (root / "ant" / "notes.txt").write_text("not an image")
    return content


def _zip_folder(folder: Path, zip_path: Path, *, prefix: str = "") -> Path:
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return zip_path


def _as_uint8(images) -> np.ndarray:
    return ((images + 1) * 127.5).round().numpy().astype(np.uint8)


def test_directory_grayscale_labels_sorted(tmp_path):
    content = _make_folder(tmp_path / "data")
    ds = load_dataset("folder", root=tmp_path / "data", split="all")
    assert ds.class_names == ("ant", "moth", "zebra") and ds.num_classes == 3
    assert ds.labels.tolist() == [0, 0, 0, 1, 2, 2]
    assert ds.images.shape == (6, 1, 6, 6)
    expected = np.stack(content["ant"] + content["moth"] + content["zebra"])
    np.testing.assert_array_equal(_as_uint8(ds.images)[:, 0], expected)
    assert load_dataset("folder", root=tmp_path / "data", split="train").labels.tolist() == ds.labels.tolist()


@pytest.mark.parametrize("prefix", ["", "wrapped/"])
def test_zip_matches_directory(tmp_path, prefix):
    _make_folder(tmp_path / "data", mode="RGB")
    archive = _zip_folder(tmp_path / "data", tmp_path / "data.zip", prefix=prefix)
    from_dir = load_dataset("folder", root=tmp_path / "data", split="all")
    from_zip = load_dataset("folder", root=archive, split="all")
    assert from_zip.images.shape == (6, 3, 6, 6)
    assert from_zip.class_names == from_dir.class_names
    assert from_zip.labels.tolist() == from_dir.labels.tolist()
    assert from_zip.fingerprint == from_dir.fingerprint


def test_mixed_grayscale_and_rgb_becomes_rgb(tmp_path):
    content = _make_folder(tmp_path / "data")
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "data" / "moth" / "img9.png")
    ds = load_dataset("folder", root=tmp_path / "data")
    assert ds.channels == 3
    pixels = _as_uint8(ds.images)
    np.testing.assert_array_equal(pixels[0], np.stack([content["ant"][0]] * 3))  # gray -> equal channels
    np.testing.assert_array_equal(pixels[4, :, 0, 0], [200, 0, 0])


def test_mixed_sizes_need_resolution(tmp_path):
    _make_folder(tmp_path / "data")
    Image.fromarray(np.full((10, 10), 255, np.uint8), mode="L").save(tmp_path / "data" / "moth" / "big.png")
    with pytest.raises(DatasetError, match="resolution") as info:
        load_dataset("folder", root=tmp_path / "data")
    assert "big.png" in str(info.value)
    ds = load_dataset("folder", root=tmp_path / "data", resolution=8)
    assert ds.images.shape == (7, 1, 8, 8) and ds.images.min() >= -1 and ds.images.max() <= 1
    assert ds.images[3].min().item() == 1.0  # the all-white image stays white


def test_non_square_needs_resolution(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 6), np.uint8), mode="L").save(tmp_path / "data" / "a" / "wide.png")
    with pytest.raises(DatasetError, match="square"):
        load_dataset("folder", root=tmp_path / "data")
    assert load_dataset("folder", root=tmp_path / "data", resolution=5).images.shape == (1, 1, 5, 5)


def test_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("folder", root=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_dataset("folder", root=tmp_path / "empty")
    _make_folder(tmp_path / "data")
    with pytest.raises(DatasetError, match="no test split"):
        load_dataset("folder", root=tmp_path / "data", split="test")
    (tmp_path / "data" / "empty_class").mkdir()
    with pytest.raises(DatasetError, match="empty_class"):
        load_dataset("folder", root=tmp_path / "data")
    (tmp_path / "data" / "empty_class").rmdir()
    (tmp_path / "data" / "ant" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match="broken.png"):
        load_dataset("folder", root=tmp_path / "data")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="bad.zip"):
        load_dataset("folder", root=tmp_path / "bad.zip")


def test_a_flat_captioned_folder_is_named_text_to_image_data(tmp_path):
    """Captioned images without class folders: one line that names the recipes that train on them."""
    rng = np.random.default_rng()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("a caption")
    with pytest.raises(DatasetError, match="text-to-image data.*sd-dp-ldm"):
        load_dataset("folder", root=tmp_path)
