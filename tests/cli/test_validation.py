"""Bad input through the real command line (issue 22): a one-line error on stderr, a non-zero exit, no
traceback, and nothing written (no run directory, no registry entry, no cap changed); options and
overrides in any order; `sample --out` by its extension.

Everything here is refused before any training, except one micro run (4x4 digits, 2 steps) that the
`sample` cases draw from.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from privdiff.cli import _parse, build_parser, main
from privdiff.privacy.registry import Registry
from tests.helpers import MICRO as MICRO_BASE

ROOT = Path(__file__).resolve().parents[2]
MICRO = [*MICRO_BASE, "train.max_steps=2", "train.checkpoint_every=2"]


def _run(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse refuses before main's own handler
        return e.code


def _refused(capsys, argv, says: str | None = None) -> str:
    capsys.readouterr()
    code = _run(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code not in (0, None) and len(lines) == 1 and "Traceback" not in err, (argv, code, err)
    if says is not None:
        assert says in lines[0], (argv, lines[0])
    return lines[0]


def _nothing_registered() -> bool:
    return Registry().status() == []


# -- item 5 / 9: recipe values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, says",
    [
        ("privacy.max_grad_norm=inf", "privacy.max_grad_norm"),
        ("privacy.epsilon=inf", "privacy.epsilon"),
        ("privacy.epsilon=nan", "privacy.epsilon"),
        ("privacy.delta=1", "privacy.delta"),
        ("train.lr=inf", "train.lr"),
        ("sampler.guidance=.nan", "sampler.guidance"),
        ("train.batch_size=[1,", "not valid YAML"),
        ("train.epochs=inf", "train.epochs"),
        ("train.checkpoint_every=0", "train.checkpoint_every"),
        ("model.channels=[]", "model.channels"),
        ("model.layers_per_block=0", "model.layers_per_block"),
        ("model.channels=[6,16]", "norm_num_groups"),
        ("privacy=5", "expected a section"),
        ("train.seed=-1", "train.seed"),
        ("train.batch_size=100000", "batch_size=100000"),
    ],
)
def test_a_bad_recipe_value_is_refused_before_anything_is_written(override, says, tmp_path, capsys):
    out = tmp_path / "run"
    data = MICRO if override.startswith("train.batch_size=1") else []  # digits: 1,437 examples, fewer than the batch
    _refused(capsys, ["train", "dpdm-mnist5k", *data, override, "--out", str(out), "--quiet"], says)
    assert not out.exists() and _nothing_registered()


def test_a_recipe_file_with_a_key_given_twice_is_refused(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("privacy: {epsilon: 1}\nprivacy: {epsilon: 50}\n")
    _refused(capsys, ["train", str(recipe), "--out", str(tmp_path / "run")], "duplicate key 'privacy'")
    assert not (tmp_path / "run").exists() and _nothing_registered()


# -- item 5 / 9 / 11: every numeric flag ---------------------------------------------------------------

CALIBRATE = ["budget", "calibrate", "--n", "60000", "--batch-size", "256"]


@pytest.mark.parametrize(
    "argv, says",
    [
        (CALIBRATE + ["--epsilon", "nan", "--delta", "1e-5", "--epochs", "1"], "--epsilon"),
        (CALIBRATE + ["--epsilon", "inf", "--delta", "1e-5", "--epochs", "1"], "--epsilon"),
        (CALIBRATE + ["--epsilon", "0", "--delta", "1e-5", "--epochs", "1"], "--epsilon"),
        (CALIBRATE + ["--epsilon", "1", "--delta", "1", "--epochs", "1"], "--delta"),
        (CALIBRATE + ["--epsilon", "1", "--delta", "2", "--epochs", "1"], "--delta"),
        (CALIBRATE + ["--epsilon", "1", "--delta", "1e-5", "--epochs", "0"], "--epochs"),
        (CALIBRATE + ["--epsilon", "1", "--delta", "1e-5", "--epochs", "-3"], "--epochs"),
        (CALIBRATE + ["--epsilon", "1", "--delta", "1e-5", "--epochs", "inf"], "--epochs"),
        (CALIBRATE + ["--epsilon", "1", "--delta", "1e-5", "--steps", "0"], "--steps"),
        (CALIBRATE + ["--epsilon", "1", "--delta", "1e-5", "--steps", "-1"], "--steps"),
        (
            [
                "budget",
                "calibrate",
                "--n",
                "0",
                "--batch-size",
                "1",
                "--epsilon",
                "1",
                "--delta",
                "1e-5",
                "--steps",
                "5",
            ],
            "--n",
        ),
        (
            [
                "budget",
                "calibrate",
                "--n",
                "10",
                "--batch-size",
                "11",
                "--epsilon",
                "1",
                "--delta",
                "1e-5",
                "--steps",
                "5",
            ],
            "--batch-size",
        ),
        (["sample", "RUN", "--n", "-5"], "--n"),
        (["sample", "RUN", "--n", "0"], "--n"),
        (["sample", "RUN", "--n", "100000000000"], "--n"),
        (["sample", "RUN", "--seed", "-1"], "--seed"),
        (["sample", "RUN", "--steps", "0"], "--steps"),
        (["sample", "RUN", "--guidance", "nan"], "--guidance"),
        (["sample", "RUN", "--guidance", "inf"], "--guidance"),
        (["sample", "RUN", "--label", "-1"], "--label"),
        (["train", "dpdm-mnist5k", "--nproc", "0"], "--nproc"),
        (["train", "dpdm-mnist5k", "--nproc", "-2"], "--nproc"),
        (["evaluate", "RUN", "--n", "1"], "--n"),
        (["evaluate", "RUN", "--seed", "-1"], "--seed"),
        (["audit", "dpdm-mnist5k", "--canaries", "0"], "--canaries"),
        (["audit", "dpdm-mnist5k", "--canaries", "10", "--k-in", "8", "--k-out", "8"], "--k-in + --k-out"),
        (["attack", "RUN", "--attack", "loss", "--n-per-role", "0"], "--n-per-role"),
        (["attack", "RUN", "--attack", "loss", "--unused-nonmembers", "-1"], "--unused-nonmembers"),
        (["he", "serve", "RUN", "--port", "70000"], "--port"),
        (["he", "serve", "RUN", "--timeout", "0"], "--timeout"),
        (["he", "serve", "RUN", "--max-body-mb", "nan"], "--max-body-mb"),
        (["he", "serve", "RUN", "--max-sessions", "0"], "--max-sessions"),
        (["he", "generate", "--server", "http://x", "--prompt", "p", "--out", "o.png", "--steps", "0"], "--steps"),
        (
            ["he", "generate", "--server", "http://x", "--prompt", "p", "--out", "o.png", "--guidance", "inf"],
            "--guidance",
        ),
        (["he", "generate", "--server", "http://x", "--prompt", "p", "--out", "o.png", "--timeout", "-1"], "--timeout"),
    ],
)
def test_every_numeric_flag_is_checked(argv, says, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused(capsys, argv, says)
    assert list(tmp_path.iterdir()) == [] and _nothing_registered()


def test_calibrate_still_answers_a_sane_question(capsys):
    assert _run(CALIBRATE + ["--epsilon", "10", "--delta", "1e-5", "--epochs", "1e1"]) == 0
    assert '"noise_multiplier"' in capsys.readouterr().out


# -- item 10: options and overrides in any order ------------------------------------------------------


@pytest.mark.parametrize(
    "argv, overrides",
    [
        (["train", "R", "--out", "D", "a=1"], ["a=1"]),
        (["train", "R", "a=1", "--quiet", "--out", "D", "b=2", "c=3"], ["a=1", "b=2", "c=3"]),
        (["train", "--out", "D", "R", "a=1"], ["a=1"]),
        (["evaluate", "RUN", "--n", "5", "k=v"], ["k=v"]),
        (["audit", "R", "--canaries", "10", "k=v", "--quiet"], ["k=v"]),
        (
            ["budget", "cap", "R", "--epsilon", "3", "data.name=x", "--registry", "G", "data.root=y"],
            ["data.name=x", "data.root=y"],
        ),
        (["demo", "--out", "D", "a=1"], ["a=1"]),
    ],
)
def test_overrides_may_follow_options(argv, overrides):
    assert _parse(build_parser(), argv).overrides == overrides


def test_an_override_after_the_options_is_applied(tmp_path, capsys):
    """It used to be "unrecognized arguments"; here it is read (and refused for its value)."""
    for argv in (
        ["train", "dpdm-mnist5k", "--out", str(tmp_path / "run"), "--quiet", "train.lr=inf"],
        ["audit", "dpdm-mnist5k", "--canaries", "10", "train.lr=inf"],
        ["budget", "cap", "dpdm-mnist5k", "--epsilon", "3", "train.lr=inf"],
    ):
        _refused(capsys, argv, "train.lr must be")
    assert list(tmp_path.iterdir()) == [] and _nothing_registered()
    _refused(capsys, ["sample", "RUN", "--n", "5", "k=v"], "unrecognized arguments: k=v")
    _refused(capsys, ["train", "dpdm-mnist5k", "--bogus"], "unrecognized arguments: --bogus")


# -- item 11: sample --out by its extension --------------------------------------------------------------


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("micro")
    Registry(base / "registry.sqlite", create=True).close()
    old = os.environ.get("PRIVDIFF_REGISTRY")
    os.environ["PRIVDIFF_REGISTRY"] = str(base / "registry.sqlite")
    try:
        assert main(["train", "dpdm-mnist5k", *MICRO, "--out", str(base / "run"), "--quiet"]) == 0
    finally:
        os.environ.pop("PRIVDIFF_REGISTRY") if old is None else os.environ.__setitem__("PRIVDIFF_REGISTRY", old)
    return base / "run"


def test_sample_writes_what_the_extension_says(micro_run, tmp_path, capsys):
    run = str(micro_run)
    assert main(["sample", run, "--n", "20", "--out", str(tmp_path / "x.npz"), "--quiet"]) == 0
    assert (tmp_path / "x.npz").is_file()
    npz = np.load(tmp_path / "x.npz")
    assert npz["images"].shape == (20, 1, 4, 4) and npz["images"].dtype == np.float32
    assert sorted(npz["labels"].tolist()) == sorted(list(range(10)) * 2)
    assert main(["sample", run, "--n", "3", "--label", "7", "--out", str(tmp_path / "Sevens.NPZ"), "--quiet"]) == 0
    assert np.load(tmp_path / "Sevens.NPZ")["labels"].tolist() == [7, 7, 7]
    for name in ("grid.PNG", "grid.png"):
        assert main(["sample", run, "--n", "10", "--out", str(tmp_path / name), "--quiet"]) == 0
        assert (tmp_path / name).is_file() and (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["sample", run, "--n", "10", "--out", str(tmp_path / "pictures.d"), "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "pictures.d").iterdir()) == ["grid.png", "samples.npz"]
    capsys.readouterr()
    before = sorted(p.name for p in tmp_path.iterdir())
    (tmp_path / "notes.txt").write_text("mine")
    _refused(capsys, ["sample", run, "--n", "10", "--out", str(tmp_path / "notes.txt")], "is a file")
    (tmp_path / "dir.png").mkdir()
    _refused(capsys, ["sample", run, "--n", "10", "--out", str(tmp_path / "dir.png")], "is a directory")
    assert (
        main(["sample", run, "--n", "4", "--out", str(tmp_path / "four.npz"), "--quiet"]) == 0
    )  # fewer than the classes
    assert np.load(tmp_path / "four.npz")["labels"].tolist() == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["notes.txt", "dir.png", "four.npz"])
    assert (tmp_path / "notes.txt").read_text() == "mine"


# -- no traceback, whatever fails -------------------------------------------------------------------------


def test_an_unforeseen_failure_is_one_line_too(monkeypatch, capsys):
    import privdiff.cli as cli

    def broken(args):
        raise KeyError("something nobody foresaw")

    monkeypatch.setattr(cli, "cmd_budget_calibrate", broken)
    line = _refused(
        capsys, CALIBRATE + ["--epsilon", "1", "--delta", "1e-5", "--steps", "5"], "internal error: KeyError"
    )
    assert "PRIVDIFF_TRACEBACK=1" in line
    monkeypatch.setenv("PRIVDIFF_TRACEBACK", "1")
    with pytest.raises(KeyError):
        main(CALIBRATE + ["--epsilon", "1", "--delta", "1e-5", "--steps", "5"])


def test_the_installed_command_prints_one_line(tmp_path):
    """As a user runs it: a separate process, its whole stderr (a malformed override used to print a traceback)."""
    env = {**os.environ, "PRIVDIFF_REGISTRY": str(tmp_path / "typo.sqlite")}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "privdiff.cli",
            "train",
            "dpdm-mnist5k",
            "--out",
            str(tmp_path / "run"),
            "train.batch_size=[1,",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "not valid YAML" in lines[0] and "Traceback" not in res.stderr, (
        res.stderr
    )
    assert list(tmp_path.iterdir()) == []
