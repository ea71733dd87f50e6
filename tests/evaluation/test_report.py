"""The run report page: self-contained (no network or file references, every image an embedded
PNG), every section present, "not available" lines for missing inputs, and it renders in headless
Chromium with every image decoded."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from privdiff.config import resolve_recipe
from privdiff.evaluation.report import write_report
from privdiff.privacy.ledger import NON_PRIVATE, SUBSAMPLED_GAUSSIAN, Ledger, Release
from privdiff.runs import Run, RunError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("metrics", "samples", "curves", "ledger", "attacks")
CHROMIUM = "/usr/bin/chromium"


def _png(size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_run(root: Path, *, private: bool = True) -> Path:
    """A fake run with every input of the report: config, ledger, log (last line cut), samples, metrics, one attack."""
    run = Run(root / "demo")
    run.path.mkdir(parents=True)
    run.save_config(resolve_recipe(None, [] if private else ["privacy.enabled=false"]))
    ledger = Ledger(
        delta=1e-5,
        accountant="rdp",
        dataset={"name": "mnist5k", "fingerprint": "sha256:0123abcd", "size": 4000},
        target_epsilon=10.0 if private else None,
    )
    ledger.record(
        Release(
            stage="dp_sgd",
            mechanism=SUBSAMPLED_GAUSSIAN if private else NON_PRIVATE,
            noise_multiplier=1.3 if private else 0.0,
            sample_rate=256 / 4000,
            max_grad_norm=1.0,
            steps=50,
        )
    )
    ledger.save(run.ledger_path)

    rng = np.random.default_rng(0)
    lines = [
        json.dumps(
            {
                "stage": "dp_sgd",
                "step": s,
                "loss": float(1 / np.sqrt(s) + 0.1 * rng.random()),
                "epsilon": float(2 * np.sqrt(s / 50)) if private else None,
                "lr": 1e-3,
                "time_s": 1.5 * s,
            }
        )
        for s in range(1, 51)
    ]
    run.train_log_path.write_text("\n".join(lines) + '\n{"stage": "dp_sgd", "step": 51, "lo')  # crashed mid-line

    (run.path / "eval").mkdir()
    np.savez_compressed(
        run.path / "eval" / "samples.npz",
        images=rng.random((100, 1, 28, 28), dtype=np.float32),
        labels=np.repeat(np.arange(10), 10).astype(np.int64),
    )
    metric = lambda v, better, **kw: {
        "value": v,
        "real": 0.5,
        "real_desc": "mnist5k train (4000) vs test (1000)",
        "better": better,
        **kw,
    }  # noqa: E731
    metrics = {
        "schema": 1,
        "run": str(run.path),
        "method": "dpdm",
        "checkpoint_step": 50,
        "created": "2026-11-22T11:00:00Z",
        "privacy": {
            "private": private,
            "epsilon": 9.99 if private else None,
            "delta": 1e-5,
            "accountant": "rdp",
            "target_epsilon": 10.0,
        },
        "train_time_s": 75.0,
        "privacy_note": "epsilon covers training only.",
        "data": {"name": "mnist5k", "class_names": [f"digit-{i}" for i in range(10)], "n_train": 4000, "n_test": 1000},
        "samples": {
            "n": 100,
            "seed": 0,
            "sampler": {"name": "heun", "steps": 64, "guidance": 2.0},
            "labels": "balanced",
        },
        "features": {
            "name": "privdiff-cnn",
            "trained_on": "digits/train (public)",
            "dim": 128,
            "sha256": "sha256:" + "ab" * 32,
        },
        "metrics": {
            "fid": metric(12.3, "lower"),
            "kid": metric(0.011, "lower", std=0.001, real_std=0.0004),
            "precision": metric(0.71, "higher"),
            "recall": {"value": 0.42, "better": "higher"},  # no real reference
            "accuracy_cnn": metric(0.91, "higher", note="epoch 12 of 30, selected on held-out synthetic (10%)"),
            "my_new_metric": {"value": 3.5},
        },
    }
    (run.path / "metrics.json").write_text(json.dumps(metrics))
    (run.path / "attacks").mkdir()
    (run.path / "attacks" / "loss-roc.png").write_bytes(_png((360, 300)))
    (run.path / "attacks" / "loss.json").write_text(
        json.dumps(
            {
                "attack": "loss",
                "auc": 0.61,
                "asr": 0.58,
                "tpr_at_fpr": {"0.01": 0.03, "0.001": 0.0},
                "n_members": 500,
                "n_nonmembers": 500,
                "roc_png": "loss-roc.png",
            }
        )
    )
    return run.path


def check_self_contained(page: str) -> list[bytes]:
    """No network or file references; returns the decoded PNG of every <img>."""
    for bad in ("http://", "https://", 'src="file:', "<link", "<script src", "@import", "url("):
        assert bad not in page, bad
    tags = re.findall(r"<img\b[^>]*>", page)
    pngs = []
    for tag in tags:
        m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', tag)
        assert m, tag[:100]
        png = base64.b64decode(m.group(1), validate=True)
        assert png.startswith(PNG_MAGIC)
        Image.open(io.BytesIO(png)).verify()
        pngs.append(png)
    return pngs


def test_full_report_is_self_contained_with_every_section(tmp_path):
    run = make_run(tmp_path)
    out = write_report(run)
    assert out == run / "report.html"
    page = out.read_text()
    pngs = check_self_contained(page)
    assert len(pngs) == 10 + 2 + 1  # one sample row per class, loss and epsilon, one ROC
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert "not available" not in page
    # header, metrics table with references, the feature network, samples, ledger, attacks
    assert "dpdm" in page and "step 50" in page and "2026-11-22T11:00:00Z" in page and "δ = 1e-05" in page
    assert "FID" in page and "12.3" in page and "± 0.001" in page and "floor" in page and "ceiling" in page
    assert (
        "epoch 12 of 30" in page
        and "my_new_metric" in page
        and "± 0.0004" in page
        and "epsilon covers training only." in page
    )
    assert "privdiff-cnn" in page and "not Inception-v3" in page
    assert all(f"<th>digit-{i}</th>" in page for i in range(10))
    assert "50 logged steps of dp_sgd" in page  # the truncated last line is skipped
    assert (
        "subsampled_gaussian" in page
        and "mnist5k" in page
        and f"ε = {Ledger.load(run / 'ledger.json').epsilon():.4g}" in page
    )
    assert "0.61" in page and "0.03" in page
    # the curves are also saved beside the numbers, and are what the page shows
    for name in ("loss.png", "epsilon.png"):
        png = (run / "eval" / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and png in pngs
    assert write_report(run, out=tmp_path / "elsewhere" / "r.html").is_file()


def test_non_private_run_has_no_epsilon(tmp_path):
    run = make_run(tmp_path, private=False)
    page = write_report(run).read_text()
    assert "non-private" in page and "not available: no ε in train_log.jsonl" in page
    assert not (run / "eval" / "epsilon.png").exists() and (run / "eval" / "loss.png").is_file()
    assert len(check_self_contained(page)) == 10 + 1 + 1


def test_missing_inputs_say_not_available(tmp_path):
    run = Run(tmp_path / "fresh")
    run.path.mkdir()
    run.save_config(resolve_recipe(None, []))
    page = write_report(run.path).read_text()
    assert check_self_contained(page) == []
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    na = re.findall(r'<p class="na">not available: ([^<]*)</p>', page)
    assert len(na) == 5, na
    assert any("metrics.json" in s and "privdiff evaluate" in s for s in na)
    assert any("samples.npz" in s for s in na) and any("train_log.jsonl" in s for s in na)
    assert any("ledger.json" in s for s in na) and any("attacks" in s for s in na)
    assert not (run.path / "eval").exists()


def test_directory_without_config_raises_and_writes_nothing(tmp_path):
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "metrics.json").write_text("{}")
    with pytest.raises(RunError, match="config.yaml"):
        write_report(tmp_path / "notarun")
    with pytest.raises(RunError):
        write_report(tmp_path / "notarun", out=tmp_path / "out" / "report.html")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["metrics.json", "notarun"]


def _chromium() -> str:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(
            f"report-render test needs headless Chromium at {CHROMIUM}: install it with "
            "`apt-get install chromium` (make test does this when run as root)"
        )
    return CHROMIUM


def test_report_renders_in_headless_chromium(tmp_path):
    chromium = _chromium()
    run = make_run(tmp_path)
    page = write_report(run)
    n_images = len(re.findall(r"<img\b", page.read_text()))
    shot = tmp_path / "report.png"

    def browser(profile: str, *action: str) -> subprocess.Popen:
        args = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / profile}",
            "--virtual-time-budget=5000",
            *action,
            page.as_uri(),
        ]
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # the two renderings run side by side: a browser start costs seconds
    dump = browser("profile-dom", "--dump-dom")
    snap = browser("profile-shot", f"--screenshot={shot}", "--window-size=1200,2400", "--hide-scrollbars")
    dom, err = dump.communicate(timeout=90)
    _, snap_err = snap.communicate(timeout=90)
    assert dump.returncode == 0, err[-2000:]
    assert snap.returncode == 0, snap_err[-2000:]

    # the page's inline script counts images that decoded (complete, naturalWidth > 0) after load
    m = re.search(r'<body[^>]*\bdata-images-loaded="(\d+)/(\d+)"', dom)
    assert m, f"page script did not run; body tag: {re.search(r'<body[^>]*>', dom)}"
    assert (int(m.group(1)), int(m.group(2))) == (n_images, n_images) and n_images == 13

    img = Image.open(shot)
    assert img.format == "PNG" and img.size == (1200, 2400)
    pixels = np.asarray(img.convert("L"), dtype=np.float32)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 50  # text, tables and pictures, not a blank page
    shutil.rmtree(tmp_path / "profile-dom", ignore_errors=True)
    shutil.rmtree(tmp_path / "profile-shot", ignore_errors=True)
