"""Captioned image folders: metadata.jsonl and caption files beside the images, and their bad forms."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from privdiff.data.captioned import load_captioned_folder
from privdiff.data.dataset import DatasetError


def _image(path, size, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def test_metadata_jsonl_pairs_and_center_crop(tmp_path):
    for i, size in enumerate([(20, 12), (12, 20), (16, 16)]):
        _image(tmp_path / f"{i}.png", size, seed=i)
    rows = [
        {"file_name": "2.png", "text": "a red square"},
        {"file_name": "0.png", "text": "a wide one"},
        {"file_name": "1.png", "text": "tall"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_captioned_folder(tmp_path, resolution=8)
    assert data.captions == ("a red square", "a wide one", "tall") and data.files == ("2.png", "0.png", "1.png")
    assert tuple(data.images.shape) == (3, 3, 8, 8) and float(data.images.min()) >= -1 and float(data.images.max()) <= 1
    # the wide image: shorter side to 8 (20x12 -> 13x8), then the central 8x8 crop
    wide = Image.open(tmp_path / "0.png").resize((13, 8), Image.Resampling.BILINEAR).crop((2, 0, 10, 8))
    np.testing.assert_array_equal(
        ((data.images[1] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy(), np.asarray(wide)
    )


def test_caption_files_and_fingerprint_covers_captions(tmp_path):
    (tmp_path / "sub").mkdir()
    _image(tmp_path / "a.jpg", (8, 8), seed=1)
    _image(tmp_path / "sub" / "b.png", (8, 8), seed=2)
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "sub" / "b.caption").write_text("second")
    data = load_captioned_folder(tmp_path, resolution=8)
    assert data.captions == ("first", "second") and data.files == ("a.jpg", "sub/b.png")
    before = data.fingerprint
    (tmp_path / "a.txt").write_text("changed")
    assert load_captioned_folder(tmp_path, resolution=8).fingerprint != before  # a caption is private data too
    gray = load_captioned_folder(tmp_path, resolution=4, channels=1)
    assert tuple(gray.images.shape) == (2, 1, 4, 4)


@pytest.mark.parametrize(
    "problem,match",
    [
        ("missing-file", "caption for a missing file"),
        ("no-caption", "no caption"),
        ("mixed-modes", "mixes grayscale"),
        ("bad-json", "not a JSON object"),
        ("outside", "points outside"),
        ("twice", "captioned twice"),
        ("not-a-dir", "not a directory"),
        ("broken-image", "cannot read image"),
    ],
)
def test_bad_captioned_folders_are_one_line_errors(tmp_path, problem, match):
    root = tmp_path / "data"
    root.mkdir()
    _image(root / "a.png", (8, 8))
    meta = [{"file_name": "a.png", "text": "x"}]
    if problem == "missing-file":
        meta.append({"file_name": "gone.png", "text": "y"})
    elif problem == "mixed-modes":
        _image(root / "b.png", (8, 8), mode="L")
        meta.append({"file_name": "b.png", "text": "y"})
    elif problem == "outside":
        _image(tmp_path / "secret.png", (8, 8))
        meta.append({"file_name": "../secret.png", "text": "y"})
    elif problem == "twice":
        meta.append({"file_name": "./a.png", "text": "y"})
    elif problem == "broken-image":
        (root / "b.png").write_bytes(b"not a png")
        meta.append({"file_name": "b.png", "text": "y"})
    if problem == "no-caption":
        pass  # no metadata.jsonl and no a.txt
    elif problem == "bad-json":
        (root / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{oops\n')
    else:
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta))
    with pytest.raises(DatasetError, match=match) as err:
        load_captioned_folder(root / "a.png" if problem == "not-a-dir" else root, resolution=8)
    assert "\n" not in str(err.value)
