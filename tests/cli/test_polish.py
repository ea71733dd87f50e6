"""Command-line polish (issue 23, item 5): help text with every option described and no empty or doubled
default, ``privdiff recipes`` and the suggestion for a missing recipe, ``compare``'s warning for metrics
older than the run's latest checkpoint, and the PRV accountant without Opacus' RDP warning."""

import argparse
import json
import re
import warnings
from importlib import resources

import numpy as np
import pytest

from privdiff.cli import build_parser, main, shipped_recipes


def _parsers(parser: argparse.ArgumentParser, name: str = "privdiff"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _parsers(p, f"{name} {sub}")


def test_every_option_is_described_and_no_default_is_empty_or_doubled():
    seen = 0
    for name, parser in _parsers(build_parser()):
        text = parser.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, name
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}: no help"
            seen += 1
        for entry in re.split(r"\n  (?=-)", text.split("options:", 1)[-1]):
            assert entry.count("default:") <= 1, f"{name}: {entry!r}"
    assert seen > 50


def test_recipes_lists_the_shipped_ones_and_a_missing_one_is_suggested(tmp_path, monkeypatch, capsys):
    files = sorted(p.name[:-5] for p in (resources.files("privdiff") / "recipes").iterdir() if p.name.endswith(".yaml"))
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == files and all(len(ln.split(maxsplit=1)) == 2 for ln in lines)
    demo = next(ln for ln in lines if ln.split()[0] == "dpdm-mnist5k")
    assert demo.split(maxsplit=1)[1] == shipped_recipes()["dpdm-mnist5k"] and demo.split(maxsplit=1)[1].startswith(
        "DPDM"
    )

    monkeypatch.chdir(tmp_path)
    assert main(["train", "dpdm-mnist5", "--out", "run", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean dpdm-mnist5k" in err[0] and "privdiff recipes" in err[0], err
    assert not (tmp_path / "run").exists()
    assert main(["recipes", "--show", "dpdm-mnist5k"]) == 0
    assert "method: dpdm" in capsys.readouterr().out


def _evaluated_run(path, rng, *, evaluated_step: int, latest_step: int):
    """A run directory as compare reads it: metrics.json of step ``evaluated_step``, checkpoints up to ``latest_step``."""
    for step in sorted({evaluated_step, latest_step}):
        (path / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
    (path / "checkpoints" / "latest").write_text(f"step-{latest_step:06d}")
    value = lambda: {"value": float(rng.uniform(1, 50))}  # noqa: E731
    metrics = {
        "method": "dpdm",
        "checkpoint_step": evaluated_step,
        "privacy": {"private": True, "epsilon": float(rng.uniform(1, 10)), "delta": 1e-5},
        "metrics": {"fid": value(), "kid": value()},
        "samples": {"n": int(rng.integers(10, 100))},
        "features": {"name": "privdiff-cnn", "sha256": "sha256:" + "ab" * 32},
    }
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def test_compare_warns_when_metrics_are_older_than_the_latest_checkpoint(tmp_path, capsys):
    rng = np.random.default_rng()
    step = int(rng.integers(1, 100))
    fresh = _evaluated_run(tmp_path / "fresh", rng, evaluated_step=step, latest_step=step)
    stale = _evaluated_run(tmp_path / "stale", rng, evaluated_step=step, latest_step=step + 50)
    assert main(["compare", str(fresh), str(stale)]) == 0
    out, err = capsys.readouterr()
    assert str(fresh) in out and str(stale) in out  # both rows are still shown
    warnings_ = err.strip().splitlines()
    assert len(warnings_) == 1 and str(stale) in warnings_[0] and f"step {step + 50}" in warnings_[0], err


def test_the_prv_accountant_prints_no_rdp_warning(capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        argv = ["budget", "calibrate", "--epsilon", "1", "--delta", "1e-5", "--n", "4000", "--batch-size", "250"]
        assert main([*argv, "--steps", "880", "--accountant", "prv"]) == 0
        assert not [w for w in caught if "Optimal order" in str(w.message)]
        warnings.warn("Optimal order is the largest alpha (from outside the PRV accountant)", stacklevel=1)
        assert [str(w.message) for w in caught] == [
            "Optimal order is the largest alpha (from outside the PRV accountant)"
        ]
    assert json.loads(capsys.readouterr().out)["accountant"] == "prv"


@pytest.fixture(autouse=True)
def _no_stray_warnings_filter():
    """main() installs its PRV filter on warnings.showwarning: each test starts and ends with the original."""
    before = warnings.showwarning
    yield
    warnings.showwarning = before
