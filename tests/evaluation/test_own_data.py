"""A user's own images end to end: a class folder, a zip of it and a colour folder go through train,
evaluate and attack (a held-out test split from data.holdout); a folder with no test split is refused by
evaluate and attack in one line, before any sampling. Fresh random PNGs, tiny models."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from privdiff.cli import main
from privdiff.data import load_dataset
from tests.helpers import image_folder, zip_folder

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes/dpdm-mnist5k.yaml")
CLASSES = {"tulip": 10, "daisy": 10, "rose": 10}
FAST = [
    "evaluate.feature_epochs=1",
    "evaluate.feature_patches=64",
    "evaluate.classifier_epochs=1",
    "evaluate.kid_subset_size=10",
    "evaluate.kid_subsets=2",
]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng()


def _train(root, tiny, *extra, out) -> int:
    """``privdiff train`` of the DPDM recipe on the folder ``root`` (a batch of 8 fits a few dozen images)."""
    return main(
        [
            "train",
            RECIPE,
            *tiny,
            "train.batch_size=8",
            "train.max_steps=2",
            "data.name=folder",
            f"data.root={root}",
            *extra,
            "--out",
            str(out),
            "--quiet",
        ]
    )


def _evaluate(run, *extra) -> int:
    return main(["evaluate", str(run), *FAST, *extra, "--n", "20", "--quiet", "--no-report"])


@pytest.mark.parametrize("packed", ["folder", "zip"])
def test_folder_and_zip_train_evaluate_and_attack_from_any_directory(
    packed, tmp_path, tiny_overrides, rng, monkeypatch, capsys
):
    folder = image_folder(tmp_path / "flowers", rng, classes=CLASSES)
    root = "flowers" if packed == "folder" else zip_folder(folder, tmp_path / "flowers.zip").name
    seed = int(rng.integers(0, 2**31))
    monkeypatch.chdir(tmp_path)  # data.root given relative to here...
    assert _train(root, tiny_overrides, "data.holdout=0.2", f"data.holdout_seed={seed}", out=tmp_path / "run") == 0
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert saved["root"] == str(tmp_path / root) and saved["holdout"] == 0.2 and saved["holdout_seed"] == seed
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # ...and every later command works from anywhere

    assert _evaluate(run) == 0, capsys.readouterr().err
    m = json.loads((run / "metrics.json").read_text())
    assert (m["data"]["n_train"], m["data"]["n_test"]) == (24, 6)  # 2 of each class's 10 held out
    assert m["data"]["class_names"] == ["daisy", "rose", "tulip"]
    assert "digits/train (public)" in m["features"]["trained_on"]  # grayscale: the public digits' feature CNN
    assert all(np.isfinite(e["value"]) for e in m["metrics"].values())

    assert main(["attack", str(run), "--attack", "loss", "--quiet"]) == 0, capsys.readouterr().err
    splits = json.loads((run / "splits.json").read_text())
    assert (
        splits["data"]["holdout"] == 0.2 and splits["data"]["holdout_seed"] == seed
    )  # the same parts can be read again
    test = load_dataset("folder", root=tmp_path / root, split="test", holdout=0.2, holdout_seed=seed, resolution=8)
    assert splits["roles"]["nonmember_test"]["fingerprint"] == test.fingerprint  # non-members: the held-out images
    ledger = json.loads((run / "ledger.json").read_text())
    assert splits["roles"]["member_test"]["fingerprint"] == ledger["dataset"]["fingerprint"]
    assert ledger["dataset"]["holdout"] == 0.2 and ledger["dataset"]["holdout_seed"] == seed
    r = json.loads((run / "attacks" / "loss.json").read_text())
    assert r["n_members"] == r["n_nonmembers"] == 3 and 0 <= r["auc"] <= 1


def test_colour_folder_evaluates_on_the_public_photo_features(tmp_path, tiny_overrides, rng, capsys):
    folder = image_folder(tmp_path / "colour", rng, classes={"red": 10, "blue": 10}, mode="RGB", size=16)
    run = tmp_path / "run"
    assert _train(folder, tiny_overrides, "data.resolution=16", "data.holdout=0.2", out=run) == 0
    assert _evaluate(run) == 0, capsys.readouterr().err
    m = json.loads((run / "metrics.json").read_text())
    assert m["features"]["name"] == "privdiff-cnn" and m["features"]["trained_on"].startswith("public-photos: 64 16x16")
    assert "not Inception" in m["features"]["note"] and all(np.isfinite(e["value"]) for e in m["metrics"].values())
    assert np.load(run / "eval" / "samples.npz")["images"].shape == (20, 3, 16, 16)


def test_a_folder_without_test_split_is_refused_before_any_work(tmp_path, tiny_overrides, rng, monkeypatch, capsys):
    folder = image_folder(tmp_path / "flowers", rng, classes=CLASSES)
    run = tmp_path / "run"
    assert (
        _train(zip_folder(folder, tmp_path / "flowers.zip"), tiny_overrides, "train.max_steps=1", out=run) == 0
    )  # no split needed
    capsys.readouterr()
    for where in (
        "privdiff.core.generation.generate",
        "privdiff.evaluation.features.fit_classifier",
        "privdiff.evaluation.evaluate.train_classifiers",
        "privdiff.attacks.run.load_target",
    ):
        monkeypatch.setattr(where, lambda *a, _w=where, **k: pytest.fail(f"{_w} ran before the split was checked"))
    for command in (
        ["evaluate", str(run), "--n", "20", "--quiet"],
        ["attack", str(run), "--attack", "loss", "--quiet"],
    ):
        t = time.perf_counter()
        assert main(command) == 2
        assert time.perf_counter() - t < 3
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            len(err) == 1 and "no test split" in err[0] and "data.holdout" in err[0] and "data.test_root" in err[0]
        ), err
    assert not (run / "metrics.json").exists() and not (run / "eval").exists() and not (run / "splits.json").exists()
