"""privdiff train / sample / budget through the real command line, on tiny models."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from privdiff.cli import main
from privdiff.privacy.accounting import epsilon

pytestmark = pytest.mark.slow
RECIPE = "recipes/dpdm-mnist5k.yaml"
ROOT = Path(__file__).resolve().parents[2]


def _train(tmp_path, tiny, *extra, out="run"):
    out = tmp_path / out
    code = main(["train", str(ROOT / RECIPE), *tiny, *extra, "--out", str(out), "--quiet"])
    return code, out


def test_train_then_sample(tmp_path, tiny_overrides, capsys):
    t = time.time()
    code, run = _train(tmp_path, tiny_overrides, "train.max_steps=3")
    assert code == 0, capsys.readouterr().err
    ledger = json.loads((run / "ledger.json").read_text())
    assert ledger["events"][0]["steps"] == 3 and ledger["events"][0]["mechanism"] == "subsampled_gaussian"
    # anyone can recompute epsilon from the events alone
    hist = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in ledger["events"]]
    assert ledger["epsilon"] == pytest.approx(epsilon(hist, delta=ledger["delta"], accountant="rdp"))
    assert 0 < ledger["epsilon"] <= 10
    assert (run / "samples" / "grid.png").is_file()
    npz = np.load(run / "samples" / "samples.npz")
    assert npz["images"].shape == (100, 1, 8, 8) and 0 <= npz["images"].min() and npz["images"].max() <= 1
    # the UNet loads with diffusers' own from_pretrained
    from diffusers import UNet2DModel

    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    UNet2DModel.from_pretrained(ckpt / "unet_ema", local_files_only=True)

    assert main(["sample", str(run), "--n", "6", "--label", "3", "--out", str(tmp_path / "three.png"), "--quiet"]) == 0
    assert (tmp_path / "three.png").stat().st_size > 0
    assert main(["budget", "show", str(run)]) == 0
    assert "epsilon" in capsys.readouterr().out
    assert time.time() - t < 60


def test_nonprivate_baseline_ledger(tmp_path, tiny_overrides):
    code, run = _train(tmp_path, tiny_overrides, "train.max_steps=2", "privacy.enabled=false")
    assert code == 0
    ledger = json.loads((run / "ledger.json").read_text())
    assert ledger["epsilon"] is None and ledger["private"] is False
    assert ledger["events"][0]["mechanism"] == "non_private"


def test_kill_and_resume_continues_the_ledger(tmp_path, tiny_overrides):
    """SIGKILL a real training process mid-run; rerunning the command resumes and never restarts the count."""
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "privdiff.cli",
        "train",
        str(ROOT / RECIPE),
        *tiny_overrides,
        "train.max_steps=40",
        "train.checkpoint_every=3",
        "--out",
        str(run),
        "--quiet",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ledger_path = run / "ledger.json"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until a checkpoint exists and a few more steps ran
        if (run / "checkpoints" / "latest").exists() and ledger_path.exists():
            if json.loads(ledger_path.read_text())["events"][0]["steps"] >= 5:
                break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    before = json.loads(ledger_path.read_text())["events"][0]["steps"]
    ckpt_step = int((run / "checkpoints" / "latest").read_text().split("-")[1])
    assert before >= ckpt_step >= 3 and before < 40
    # resume: the ledger continues from what was counted (never restarts); the steps replayed from
    # the checkpoint draw the same batches and noise, so they are not counted twice
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    ledger = json.loads(ledger_path.read_text())
    total = sum(e["steps"] for e in ledger["events"])
    assert total == 40  # every executed step counted exactly once: the ledger of an uninterrupted run
    assert ledger["epsilon"] <= 10
    # the training log has each step of the final trajectory once, its clock continues, and its
    # last epsilon is the ledger's
    from privdiff.runs import Run

    log = Run(run).read_train_log()
    assert [e["step"] for e in log] == list(range(1, 41))
    times = [e["time_s"] for e in log]
    assert times == sorted(times) and all(np.isfinite(e["loss"]) for e in log)
    assert log[-1]["epsilon"] == pytest.approx(ledger["epsilon"])


def test_budget_is_never_exceeded(tmp_path, tiny_overrides, capsys):
    """Steps that ran after the last checkpoint stay spent: the resumed run stops at the target epsilon."""
    args = ("train.epochs=0.05", "privacy.epsilon=2", "train.checkpoint_every=3")
    code, run = _train(tmp_path, tiny_overrides, *args)
    assert code == 0
    planned = round(0.05 * 4000 / 32)
    ledger = json.loads((run / "ledger.json").read_text())
    assert ledger["events"][0]["steps"] == planned
    assert 2.0 * 0.99 < ledger["epsilon"] <= 2.0
    # simulate a crash after the last step touched the data but before its checkpoint was written:
    # the resumed run replays steps 3..planned with the draws already counted, and counts nothing new
    shutil.rmtree(run / "checkpoints" / f"step-{planned:06d}")
    (run / "checkpoints" / "latest").write_text("step-000003\n")
    capsys.readouterr()
    code, _ = _train(tmp_path, tiny_overrides, *args)
    assert code == 0
    after = json.loads((run / "ledger.json").read_text())
    assert after["events"][0]["steps"] == planned and after["epsilon"] == ledger["epsilon"] <= 2.0


def test_corrupted_checkpoint_is_set_aside_and_training_resumes(tmp_path, tiny_overrides, capsys):
    """The only checkpoint is damaged: it is kept aside, said on stderr, and training starts again from step 0
    with the ledger's count kept; the damaged checkpoint had been written, so its two steps are taken again with fresh
    batches and noise and counted again (2 + 4 steps; tests/test_runs.py has more)."""
    code, run = _train(tmp_path, tiny_overrides, "train.max_steps=2")
    assert code == 0
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    weights = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    ledger_before = json.loads((run / "ledger.json").read_text())
    capsys.readouterr()
    code, _ = _train(tmp_path, tiny_overrides, "train.max_steps=4")
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err
    assert "corrupted" in err and "diffusion_pytorch_model.safetensors" in err and "starts again from step 0" in err
    assert (run / "checkpoints" / "damaged" / ckpt.name / "unet" / weights.name).is_file()
    after = json.loads((run / "ledger.json").read_text())
    assert after["run_id"] == ledger_before["run_id"] and after["events"][0]["steps"] == 6  # continued, never restarted
    assert "taken again with fresh batches and noise" in err


def test_bad_dataset_path_gives_a_clear_error(tmp_path, tiny_overrides, capsys):
    code, run = _train(tmp_path, tiny_overrides, "data.name=mnist", f"data.root={tmp_path / 'nowhere'}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "nowhere" in err[0]
    assert not (run / "ledger.json").exists()


def test_unknown_override_and_changed_recipe(tmp_path, tiny_overrides, capsys):
    code, _ = _train(tmp_path, tiny_overrides, "privacy.epsilom=3")
    assert code == 2 and "unknown recipe key 'privacy.epsilom'" in capsys.readouterr().err
    code, run = _train(tmp_path, tiny_overrides, "train.max_steps=1")
    assert code == 0
    code, _ = _train(tmp_path, tiny_overrides, "train.max_steps=1", "privacy.epsilon=3")
    assert code == 2 and "different recipe (privacy.epsilon)" in capsys.readouterr().err
    # continuing a smoke run for more steps is a resume, not a new recipe
    code, _ = _train(tmp_path, tiny_overrides, "train.max_steps=2")
    assert code == 0
    assert json.loads((run / "ledger.json").read_text())["events"][0]["steps"] == 2


def test_budget_calibrate_command(capsys):
    assert (
        main(
            [
                "budget",
                "calibrate",
                "--epsilon",
                "10",
                "--delta",
                "1e-5",
                "--n",
                "4000",
                "--batch-size",
                "400",
                "--epochs",
                "50",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 500 and out["epsilon"] <= 10 and out["epsilon"] == pytest.approx(10, rel=5e-3)


def test_help_runs():
    res = subprocess.run([sys.executable, "-m", "privdiff.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "train" in res.stdout and "budget" in res.stdout


def test_python_dash_m_privdiff_is_the_same_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "privdiff", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: privdiff" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "privdiff", "train"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
