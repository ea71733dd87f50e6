"""`privdiff train --nproc 2` (torchrun, 2 CPU processes, gloo): the same ledger as one process, and resumable on one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from privdiff.cli import main
from privdiff.privacy.accounting import epsilon
from privdiff.privacy.registry import Registry
from privdiff.runs import Run

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes/dpdm-mnist5k.yaml")


def test_two_processes_same_epsilon_as_one_then_resume_on_one(tmp_path, tiny_overrides, capsys):
    w2, w1 = tmp_path / "w2", tmp_path / "w1"
    cmd = [
        sys.executable,
        "-m",
        "privdiff.cli",
        "train",
        RECIPE,
        *tiny_overrides,
        "train.max_steps=2",
        "--out",
        str(w2),
        "--quiet",
        "--nproc",
        "2",
    ]
    res = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=1200
    )  # minutes only on a saturated machine
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("epsilon:") == 1  # rank 0 reports, once
    assert main(["train", RECIPE, *tiny_overrides, "train.max_steps=2", "--out", str(w1), "--quiet"]) == 0

    # the ledger's epsilon (and every event) is the same for W=2 and W=1
    l2, l1 = (json.loads((d / "ledger.json").read_text()) for d in (w2, w1))
    assert l2["events"] == l1["events"] and l2["events"][0]["steps"] == 2
    assert l2["epsilon"] == l1["epsilon"] > 0
    # rank 0 alone wrote: one log line per step, one checkpoint, no stray temporary files
    assert [e["step"] for e in Run(w2).read_train_log()] == [1, 2]
    assert (w2 / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert not [p for p in w2.rglob("*") if p.name.endswith(".tmp")]
    # the budget registry holds ONE run for the two processes (rank 0 admits and records), with the ledger's events
    (status,) = Registry().status()
    runs_w2 = [r for r in status.runs if r.run_id == l2["run_id"]]
    triples = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in l2["events"]]
    assert len(status.runs) == 2 and len(runs_w2) == 1 and [e.triple for e in runs_w2[0].events] == triples

    # the W=2 run resumes on ONE process and its ledger continues the count
    capsys.readouterr()
    assert main(["train", RECIPE, *tiny_overrides, "train.max_steps=3", "--out", str(w2), "--quiet"]) == 0
    ledger = json.loads((w2 / "ledger.json").read_text())
    (event,) = ledger["events"]
    assert event["steps"] == 3
    assert ledger["epsilon"] == pytest.approx(
        epsilon([(event["noise_multiplier"], event["sample_rate"], 3)], delta=ledger["delta"])
    )
    assert [e["step"] for e in Run(w2).read_train_log()] == [1, 2, 3]
    assert (w2 / "checkpoints" / "latest").read_text().strip() == "step-000003"
