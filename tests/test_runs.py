"""Run directories: resuming past damaged or missing checkpoints, damaged run files, a full disk.

Every damaged-file case goes through the real command line: one line on stderr, a non-zero exit,
no traceback, nothing on disk changed, no temporary left. A resume that falls back past a damaged
checkpoint keeps the ledger's count (the steps after the intact checkpoint were spent); since the
unusable checkpoint had been written, those steps are taken again with fresh draws and counted again
(a replay under the same noise could release a second, different output of it).
"""

import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from privdiff.cli import main
from privdiff.privacy.registry import Registry
from privdiff.runs import Run
from tests.helpers import MICRO as MICRO_BASE

pytestmark = pytest.mark.slow

MICRO = [*MICRO_BASE, "train.max_steps=4", "train.checkpoint_every=2"]
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One finished micro run (checkpoints at steps 2 and 4); each test works on its own copy."""
    base = tmp_path_factory.mktemp("trained")
    old = os.environ.get("PRIVDIFF_REGISTRY")
    Registry(base / "registry.sqlite", create=True).close()  # a given registry must exist (privdiff budget init)
    os.environ["PRIVDIFF_REGISTRY"] = str(base / "registry.sqlite")
    try:
        assert main(["train", "dpdm-mnist5k", *MICRO, "--out", str(base / "run"), "--quiet"]) == 0
    finally:
        if old is None:
            os.environ.pop("PRIVDIFF_REGISTRY")
        else:
            os.environ["PRIVDIFF_REGISTRY"] = old
    return base / "run"


@pytest.fixture
def run(trained, tmp_path) -> Run:
    shutil.copytree(trained, tmp_path / "run")
    return Run(tmp_path / "run")


def _snapshot(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[random.randrange(len(data))] ^= 1 << random.randrange(8)
    path.write_bytes(bytes(data))


def _events(run: Run) -> list[dict]:
    return json.loads(run.ledger_path.read_text())["events"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("privdiff: error: ") and "Traceback" not in err, err
    return lines[0]


def _steps(events: list[dict]) -> int:
    return sum(e["steps"] for e in events if e["stage"] == "dp_sgd")


def _epsilon_recomputes(run: Run) -> None:
    from privdiff.privacy.accounting import epsilon

    d = json.loads(run.ledger_path.read_text())
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in d["events"]]
    assert abs(epsilon(history, delta=d["delta"], accountant=d["accountant"]) - d["epsilon"]) < 1e-9


def _resume(run: Run) -> list[str]:
    return ["train", str(run.config_path), "--out", str(run.path), "--quiet"]


# -- resuming past damaged or missing checkpoints (the advice printed is one that works) -----------


def test_a_damaged_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(run, capsys):
    events = _events(run)
    original = load_file(run.checkpoints / "step-000004" / "unet" / WEIGHTS)
    _flip_a_byte(run.checkpoints / "step-000004" / "unet_ema" / WEIGHTS)
    assert main(["sample", str(run.path), "--n", "4", "--quiet"]) == 2
    err = _one_line_error(capsys)
    assert "corrupted" in err and WEIGHTS in err
    advice = err.split("newest intact checkpoint: ")[1].split()
    assert advice[:2] == ["privdiff", "train"]
    assert main([*advice[1:], "--quiet"]) == 0  # the advice, as printed, works
    err = capsys.readouterr().err
    assert "moved to" in err and "resuming dp_sgd from step-000002" in err and "Traceback" not in err
    assert (run.checkpoints / "damaged" / "step-000004" / "unet_ema" / WEIGHTS).is_file()  # kept, not deleted
    assert "taken again with fresh batches and noise" in err and "counts the new ones too" in err
    # steps 3-4 were spent, and their output was written: they stay counted, and the fresh re-run is counted too
    assert _steps(_events(run)) == _steps(events) + 2
    _epsilon_recomputes(run)
    retaken = load_file(run.checkpoints / "step-000004" / "unet" / WEIGHTS)
    assert any((retaken[k] != original[k]).any() for k in original)  # fresh draws, not a replay of the same noise
    assert [e["step"] for e in run.read_train_log()] == [1, 2, 3, 4]
    assert main(["sample", str(run.path), "--n", "4", "--quiet"]) == 0


def test_deleting_a_damaged_checkpoint_as_the_old_advice_said_still_resumes(run, capsys):
    events = _events(run)
    shutil.rmtree(run.checkpoints / "step-000004")  # latest now points to a missing checkpoint
    assert main(["sample", str(run.path), "--n", "4", "--quiet"]) == 2
    assert "points to missing checkpoint" in _one_line_error(capsys)
    assert main(_resume(run)) == 0
    assert "resuming dp_sgd from step-000002" in capsys.readouterr().err
    assert _steps(_events(run)) == _steps(events) + 2  # step-000004 had been written: steps 3-4 re-taken afresh
    _epsilon_recomputes(run)
    assert run.latest_checkpoint().name == "step-000004"


def test_with_no_intact_checkpoint_left_training_restarts_and_the_ledger_keeps_its_count(run, capsys):
    events = _events(run)
    (run.checkpoints / "step-000002" / "state.json").write_text("{not json")
    (run.checkpoints / "latest").write_text("garbage\n")
    _flip_a_byte(run.checkpoints / "step-000004" / "optimizer.pt")
    assert main(_resume(run)) == 0
    err = capsys.readouterr().err
    assert "starts again from step 0" in err and "ledger keeps every step" in err
    assert _steps(_events(run)) == _steps(events) + 4  # it never restarts the count; written steps are re-taken afresh
    _epsilon_recomputes(run)
    assert sorted(p.name for p in (run.checkpoints / "damaged").iterdir()) == ["step-000002", "step-000004"]


# -- damaged run files: one line, non-zero exit, nothing touched ------------------------------------


def _damage(run: Run, what: str) -> None:
    cut = lambda p: p.write_text(
        "".join(p.read_text().splitlines(keepends=True)[: len(p.read_text().splitlines()) // 2])
    )  # noqa: E731
    if what == "config-garbage":
        run.config_path.write_bytes(os.urandom(200))
    elif what == "config-cut":
        cut(run.config_path)  # still YAML, but a recipe's second half is gone
    elif what == "config-empty":
        run.config_path.write_text("")
    elif what == "config-list":
        run.config_path.write_text("- 1\n- 2\n")
    elif what == "state-garbage":
        (run.checkpoints / "step-000004" / "state.json").write_text('{"step": "x", "sha256": 3}')
    elif what == "ledger-garbage":
        run.ledger_path.write_bytes(os.urandom(100))
    elif what == "ledger-event":
        d = json.loads(run.ledger_path.read_text())
        d["events"][0]["steps"] = "many"
        run.ledger_path.write_text(json.dumps(d))
    elif what == "ledger-cut":
        cut(run.ledger_path)
    elif what == "samples-garbage":
        (run.path / "eval").mkdir(exist_ok=True)
        (run.path / "eval" / "samples.npz").write_bytes(b"PK\x03\x04" + os.urandom(300))


CASES = (
    [
        (d, c)
        for d in ("config-garbage", "config-cut", "config-empty", "config-list")
        for c in ("sample", "train", "evaluate")
    ]
    + [(d, c) for d in ("state-garbage",) for c in ("sample", "evaluate")]
    + [(d, c) for d in ("ledger-garbage", "ledger-event", "ledger-cut") for c in ("train", "budget", "evaluate")]
    + [("samples-garbage", "evaluate")]
)


@pytest.mark.parametrize("damage,command", CASES)
def test_a_damaged_run_file_is_a_one_line_error_and_nothing_is_touched(run, capsys, damage, command):
    _damage(run, damage)
    before = _snapshot(run.path)
    argv = {
        "sample": ["sample", str(run.path), "--n", "4", "--quiet"],
        "train": ["train", "dpdm-mnist5k", *MICRO, "train.max_steps=6", "--out", str(run.path), "--quiet"],
        "evaluate": ["evaluate", str(run.path), "--n", "20", "--no-report", "--quiet"],
        "budget": ["budget", "show", str(run.path)],
    }[command]
    assert main(argv) != 0
    err = _one_line_error(capsys)
    assert str(run.path) in err
    assert _snapshot(run.path) == before  # nothing lost, nothing half-written
    assert not list(run.path.rglob("*.tmp"))


# -- a full disk while a checkpoint is written --------------------------------------------------------


@contextlib.contextmanager
def _small_disk(path: Path, size: str):
    """``path`` on a tmpfs of ``size`` (needs root and mount); yields a function that enlarges it, or None."""
    path.mkdir()
    if (
        os.geteuid() != 0
        or shutil.which("mount") is None
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        != 0
    ):
        yield None
        return
    try:
        yield lambda new: subprocess.run(["mount", "-o", f"remount,size={new}", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _train_process(out: Path, registry: Path, *, fsize: int, extra: list[str] = ()) -> subprocess.CompletedProcess:
    def limit():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "PRIVDIFF_REGISTRY": str(registry), "PRIVDIFF_TEST_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "privdiff.cli", "train", "dpdm-mnist5k", *MICRO, *extra, "--out", str(out), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )


def test_a_full_disk_while_writing_a_checkpoint_loses_nothing_and_the_run_resumes(
    trained, tmp_path, capsys, monkeypatch
):
    """The run dir on a tmpfs that holds one checkpoint but not two (or, without root, in a child process
    whose file-size limit the optimizer state passes): a one-line error, the checkpoint written before
    intact, no temporary left, and once there is room the run resumes to the ledger of an uninterrupted run."""
    registry = tmp_path / "registry.sqlite"
    Registry(registry, create=True).close()
    monkeypatch.setenv("PRIVDIFF_REGISTRY", str(registry))
    with _small_disk(tmp_path / "disk", "300k") as enlarge:
        out = tmp_path / "disk" / "run"
        if enlarge:
            assert main(["train", "dpdm-mnist5k", *MICRO, "--out", str(out), "--quiet"]) == 2
            line = _one_line_error(capsys)
        else:
            # a 32-channel UNet: its optimizer state (~1.4 MB) passes the limit, the registry's SQLite files do not
            res = _train_process(out, registry, fsize=600_000, extra=["model.channels=[32]"])
            lines = res.stderr.strip().splitlines()
            assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
            line = lines[0]
        assert "cannot write checkpoint" in line and "previous checkpoints are intact" in line
        assert not list(out.rglob("*.tmp"))
        run = Run(out)
        ledger = json.loads(run.ledger_path.read_text())  # whole
        latest = run.latest_checkpoint()
        if latest is not None:
            run.verify_checkpoint(latest)  # the checkpoint written before the disk filled is intact
            assert latest.name == "step-000002" and ledger["events"][0]["steps"] >= 2
        if enlarge:
            enlarge("4m")
            assert main(["train", "dpdm-mnist5k", *MICRO, "--out", str(out), "--quiet"]) == 0
            assert _events(run) == _events(Run(trained))  # every step counted exactly once


def test_a_later_resume_after_a_retake_still_counts_every_new_step(run, capsys):
    """The re-taken steps put the ledger's count ahead of the step index; every later checkpoint carries that
    offset, so a later resume never mistakes steps that never ran for replays (it would under-count)."""
    events = _events(run)
    _flip_a_byte(run.checkpoints / "step-000004" / "unet" / WEIGHTS)
    assert main([*_resume(run), "train.max_steps=6"]) == 0  # re-takes 3-4 afresh, then runs 5-6
    assert _steps(_events(run)) == _steps(events) + 4
    assert main([*_resume(run), "train.max_steps=8"]) == 0  # resumes at 6 with the offset: 7-8 are new, counted
    assert _steps(_events(run)) == _steps(events) + 6
    _epsilon_recomputes(run)
    assert [e["step"] for e in run.read_train_log()][-2:] == [7, 8]
    capsys.readouterr()
