"""Crash safety: `privdiff train` killed with SIGKILL at random moments, rerun until it completes.

The training processes run the real command line, forked from a forkserver that has imported
privdiff once, so many kill points fit in seconds. (Not forked from the test process itself: by the
time this test runs, earlier tests have left threads (TenSEAL, aiohttp, torch) whose locks a fork
copies held, and the child can crash or hang.) After every kill: every file in the run parses
(nothing half-written), the ledger's epsilon is what its events compose to, the latest checkpoint
loads; at the end the ledger equals the one of an uninterrupted run with the same seed.
"""

import json
import multiprocessing
import os
import random
import time

import pytest
import torch

from privdiff.cli import main
from privdiff.privacy.accounting import epsilon
from privdiff.privacy.registry import Registry
from privdiff.runs import Run
from tests.helpers import MICRO as MICRO_BASE

pytestmark = pytest.mark.slow

MICRO = [*MICRO_BASE, "train.max_steps=6", "train.checkpoint_every=2"]


def _train(out, registry):
    os.environ["PRIVDIFF_REGISTRY"] = str(registry)
    torch.set_num_threads(1)
    os._exit(main(["train", "dpdm-mnist5k", *MICRO, "--out", str(out), "--quiet"]))


def _noop() -> None:
    pass


def _join(p, timeout: float = 300.0) -> None:
    """Wait for a training process; one that hangs fails the test instead of stalling the suite."""
    p.join(timeout)
    if p.exitcode is None:
        p.kill()
        p.join()
        pytest.fail(f"a training process did not finish within {timeout:.0f} s")


def _assert_consistent(run: Run) -> None:
    """Nothing half-written; the ledger's epsilon is what its events say; the latest checkpoint loads."""
    for f in run.path.rglob("*.json"):
        if not f.name.startswith("."):
            json.loads(f.read_text())
    if run.ledger_path.exists():
        ledger = json.loads(run.ledger_path.read_text())
        hist = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in ledger["events"]]
        assert ledger["epsilon"] == pytest.approx(epsilon(hist, delta=ledger["delta"], accountant=ledger["accountant"]))
    if run.latest_checkpoint() is not None:
        state = run.load_checkpoint()
        steps = sum(e["steps"] for e in json.loads(run.ledger_path.read_text())["events"])
        assert state.step <= steps <= state.step + 2  # checkpointed steps were counted; at most one interval ahead


def test_sigkill_at_random_moments_then_resume(tmp_path):
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["privdiff.cli"])
    warm = ctx.Process(target=_noop)  # start the forkserver (it imports privdiff) before anything is timed
    warm.start()
    _join(warm)
    # the uninterrupted reference (also warms this process's caches, which the forks inherit)
    for name in ("reference.sqlite", "registry.sqlite"):  # a given registry must exist (privdiff budget init)
        Registry(tmp_path / name, create=True).close()
    t0 = time.perf_counter()
    p = ctx.Process(target=_train, args=(tmp_path / "reference", tmp_path / "reference.sqlite"))
    p.start()
    _join(p)
    assert p.exitcode == 0
    span = time.perf_counter() - t0
    reference = json.loads((tmp_path / "reference" / "ledger.json").read_text())

    run, rng, kills = Run(tmp_path / "run"), random.Random(0), 0
    for attempt in range(40):
        p = ctx.Process(target=_train, args=(run.path, tmp_path / "registry.sqlite"))
        p.start()
        if kills < 5:
            # early enough that a resumed attempt (fewer steps left) is still caught before it finishes
            p.join(timeout=rng.uniform(0.05, 0.4 * span))
            if p.exitcode is None:
                p.kill()  # SIGKILL
                kills += 1
        _join(p)
        _assert_consistent(run)
        if p.exitcode == 0:
            break
    assert p.exitcode == 0 and kills >= 3
    assert not list(run.path.rglob(".*.tmp"))  # a completed run leaves no temporaries behind
    ledger = json.loads(run.ledger_path.read_text())
    assert ledger["events"] == reference["events"]  # each executed step counted exactly once
    assert ledger["epsilon"] == reference["epsilon"]
    assert [e["step"] for e in run.read_train_log()] == list(range(1, 7))
    # the registry holds the run once, with exactly the ledger's events (one row per event, no duplicates)
    (status,) = Registry(tmp_path / "registry.sqlite").status()
    assert [r.run_id for r in status.runs] == [ledger["run_id"]]
    assert [
        {k: getattr(e, k) for k in ("stage", "mechanism", "noise_multiplier", "sample_rate", "steps")}
        for e in status.runs[0].events
    ] == [
        {k: e[k] for k in ("stage", "mechanism", "noise_multiplier", "sample_rate", "steps")} for e in ledger["events"]
    ]
    assert status.spent == pytest.approx(ledger["epsilon"])


def test_a_capped_data_set_refuses_a_run_before_it_reads_data(tmp_path, capsys):
    registry = tmp_path / "registry.sqlite"
    argv = ["--registry", str(registry)]
    assert main(["budget", "init", *argv]) == 0
    assert main(["budget", "cap", "dpdm-mnist5k", *MICRO[:2], "--epsilon", "3.3", *argv]) == 0
    os.environ["PRIVDIFF_REGISTRY"] = str(registry)
    train = ["train", "dpdm-mnist5k", *MICRO, "train.max_steps=2"]
    # two steps of sigma calibrated for epsilon=5 over the recipe's 180: epsilon 3.23 planned, under the cap
    assert main([*train, "privacy.epsilon=5", "--quiet", "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert (
        main([*train, "privacy.epsilon=5", "--quiet", "--out", str(tmp_path / "b")]) == 2
    )  # the same again composes to 3.39, past 3.3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused" in err[0] and "over its cap 3.3" in err[0]
    assert not (tmp_path / "b" / "ledger.json").exists() and not (tmp_path / "b" / "checkpoints").exists()
    assert main(["budget", "status", "--dataset", "digits", *argv]) == 0
    out = capsys.readouterr().out
    assert "1 runs" in out and "cap epsilon=3.3" in out and str(tmp_path / "a") in out
