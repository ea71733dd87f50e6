"""privdiff evaluate / compare through the command line on a tiny trained run."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from privdiff.cli import main
from privdiff.evaluation import evaluate as ev

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
FAST = [
    "evaluate.feature_epochs=2",
    "evaluate.classifier_epochs=2",
    "evaluate.max_real=300",
    "evaluate.kid_subset_size=50",
    "evaluate.kid_subsets=10",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, privdiff_cache):
    from tests.helpers import TINY

    out = tmp_path_factory.mktemp("eval") / "run"
    assert (
        main(
            ["train", str(ROOT / "recipes/dpdm-mnist5k.yaml"), *TINY, "train.max_steps=3", "--out", str(out), "--quiet"]
        )
        == 0
    )
    return out


def _evaluate(run, *extra, n=60):
    return main(["evaluate", str(run), *FAST, *extra, "--n", str(n), "--quiet"])


def test_evaluate_writes_metrics_with_floors_ceilings_and_a_report(trained, capsys, monkeypatch):
    order = []
    from privdiff.core import stages

    real_load, real_train = stages.recipe_dataset, ev.train_classifiers  # every read of the run's data goes through it
    monkeypatch.setattr(
        stages, "recipe_dataset", lambda recipe, **kw: order.append(("load", kw["split"])) or real_load(recipe, **kw)
    )
    monkeypatch.setattr(
        ev, "train_classifiers", lambda *a, **kw: order.append(("fit", kw.get("source"))) or real_train(*a, **kw)
    )
    assert _evaluate(trained) == 0
    out = capsys.readouterr().out
    assert "FID" in out and "(floor)" in out and "(ceiling)" in out
    # the private test split is read once, after every classifier was trained and selected
    assert order.count(("load", "test")) == 1
    assert order.index(("load", "test")) > max(i for i, e in enumerate(order) if e[0] == "fit")

    m = json.loads((trained / "metrics.json").read_text())
    for key in ("fid", "kid", "precision", "recall", "accuracy_cnn", "accuracy_logreg"):
        entry = m["metrics"][key]
        assert np.isfinite(entry["value"]) and np.isfinite(entry["real"]), key
        assert entry["better"] in ("lower", "higher") and entry["real_desc"]
    assert m["metrics"]["fid"]["value"] > m["metrics"]["fid"]["real"] >= 0  # 3 training steps are far from the data
    assert m["features"]["name"] == "privdiff-cnn" and "digits/train (public)" in m["features"]["trained_on"]
    assert m["samples"]["n"] == 60 and m["privacy"]["private"] and 0 < m["privacy"]["epsilon"] <= 10
    assert m["train_time_s"] > 0 and m["checkpoint_step"] == 3
    assert "held-out synthetic" in m["metrics"]["accuracy_cnn"]["note"]
    html = (trained / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html
    samples = np.load(trained / "eval" / "samples.npz")
    assert samples["images"].shape == (60, 1, 8, 8) and sorted(np.bincount(samples["labels"])) == [6] * 10

    # a second evaluation reuses the samples and the cached real-data numbers
    monkeypatch.setattr("privdiff.core.generation.generate", lambda *a, **k: pytest.fail("samples were drawn again"))
    assert _evaluate(trained) == 0
    again = json.loads((trained / "metrics.json").read_text())
    assert again["metrics"]["fid"] == m["metrics"]["fid"]


def test_compare_lines_up_runs(trained, tmp_path, capsys):
    if not (trained / "metrics.json").exists():
        assert _evaluate(trained) == 0
    other = tmp_path / "copy"
    shutil.copytree(trained, other)
    capsys.readouterr()
    assert main(["compare", str(trained), str(other), "--out", str(tmp_path / "table")]) == 0
    out = capsys.readouterr().out
    assert "fid" in out and "acc_cnn" in out and str(other) in out
    csv = (tmp_path / "table.csv").read_text().splitlines()
    assert len(csv) == 3 and csv[0].startswith("run,method,epsilon")
    assert "| run | method |" in (tmp_path / "table.md").read_text()
    assert main(["compare", str(tmp_path / "nowhere")]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def test_bad_runs_give_one_line_errors_and_no_partial_metrics(trained, tmp_path, capsys):
    # not a run
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "not a privdiff run" in capsys.readouterr().err and not (tmp_path / "metrics.json").exists()
    # a run with no checkpoint
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(trained / "config.yaml", bare / "config.yaml")
    assert main(["evaluate", str(bare)]) == 2
    assert "no checkpoint" in capsys.readouterr().err and not (bare / "metrics.json").exists()
    # damaged and wrongly shaped samples: an error, and the earlier metrics.json is left as it was
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    if not (run / "metrics.json").exists():
        assert _evaluate(run) == 0
    before = (run / "metrics.json").read_bytes()
    (run / "eval" / "samples.npz").write_bytes(b"not an npz")
    assert _evaluate(run) == 2
    assert "unreadable samples" in capsys.readouterr().err and (run / "metrics.json").read_bytes() == before
    meta = ev._samples_meta(ev.Run(run), ev.Run(run).load_config(), n=60, seed=0)
    np.savez(
        run / "eval" / "samples.npz",
        images=np.random.rand(60, 3, 8, 8).astype(np.float32),
        labels=np.arange(60) % 10,
        meta=np.array(json.dumps(meta)),
    )
    assert _evaluate(run) == 2
    assert "expected (60, 1, 8, 8)" in capsys.readouterr().err and (run / "metrics.json").read_bytes() == before
    # only evaluation settings may be overridden
    assert main(["evaluate", str(run), "privacy.epsilon=1"]) == 2
    assert "only evaluate.* and sampler.*" in capsys.readouterr().err


def test_inception_weights_from_a_local_file(trained, tmp_path, capsys):
    from privdiff.evaluation.inception import FIDInceptionV3

    torch.manual_seed(11)
    weights = tmp_path / "inception.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert _evaluate(run, "evaluate.max_real=8", "--inception-weights", str(weights), "--no-report", n=6) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["features"]["name"] == "inception-v3-compat" and m["features"]["dim"] == 2048
    assert m["features"]["sha256"].startswith("sha256:") and np.isfinite(m["metrics"]["fid"]["value"])
    capsys.readouterr()
    assert _evaluate(run, "--inception-weights", str(tmp_path / "missing.pth"), n=6) == 2
    assert "missing.pth" in capsys.readouterr().err


def test_class_consistency_is_the_real_data_cnn_on_the_samples(trained, privdiff_cache, tmp_path, monkeypatch, capsys):
    """metrics.class_consistency: the fraction of the samples that the ceiling's CNN (trained on the real training
    split) assigns to their intended class, equal to that fraction computed here, on fresh random samples; the
    same from the cached network; absent for unlabelled samples (an unconditional model)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for kind in ("ceiling", ev.CEILING_CNN):  # the ceiling is trained in this test (the feature CNN is reused)
        shutil.rmtree(privdiff_cache / kind, ignore_errors=True)
    real_fits, real_train = [], ev.train_classifiers

    def spy(*a, **kw):
        fits = real_train(*a, **kw)
        if kw.get("source") == "real training split":
            real_fits.append(fits)
        return fits

    monkeypatch.setattr(ev, "train_classifiers", spy)
    meta = np.array(json.dumps(ev._samples_meta(ev.Run(run), ev.Run(run).load_config(), n=60, seed=0)))
    rng = np.random.default_rng(20)
    images = rng.random((60, 1, 8, 8), dtype=np.float32)
    labels = rng.permutation(np.arange(60) % 10)
    np.savez(run / "eval" / "samples.npz", images=images, labels=labels, meta=meta)
    assert _evaluate(run, "--no-report") == 0
    assert "class consistency" in capsys.readouterr().out
    (fits,) = real_fits
    with torch.no_grad():
        predicted = fits["cnn"].model.eval()(torch.from_numpy(images)).argmax(1).numpy()
    m = json.loads((run / "metrics.json").read_text())["metrics"]
    assert m["class_consistency"]["value"] == (predicted == labels).mean()
    assert m["class_consistency"]["real"] == m["accuracy_cnn"]["real"]  # the CNN on real test images of each class
    assert m["class_consistency"]["better"] == "higher" and "non-private" in m["class_consistency"]["note"]
    assert "class consistency" in ev.PRIVACY_NOTE

    # samples labelled as that CNN sees them: 1, with the network read back from the cache (not trained again)
    np.savez(run / "eval" / "samples.npz", images=images, labels=predicted.astype(np.int64), meta=meta)
    assert _evaluate(run, "--no-report") == 0
    assert len(real_fits) == 1 and "class consistency" in capsys.readouterr().out
    assert json.loads((run / "metrics.json").read_text())["metrics"]["class_consistency"]["value"] == 1.0

    # an unconditional model's samples carry no labels: no class consistency (nor downstream accuracy)
    unlabelled = (images, np.zeros(0, dtype=np.int64))
    monkeypatch.setattr(ev, "load_or_draw_samples", lambda *a, **k: unlabelled)
    assert _evaluate(run, "--no-report") == 0
    m = json.loads((run / "metrics.json").read_text())["metrics"]
    assert "class_consistency" not in m and "accuracy_cnn" not in m
    assert "class consistency" not in capsys.readouterr().out
