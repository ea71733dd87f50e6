"""privdiff attack through the real command line, on a tiny DPDM run."""

import json
from pathlib import Path

import pytest

from privdiff.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tests.helpers import TINY

    out = tmp_path_factory.mktemp("attack") / "run"
    assert (
        main(
            ["train", str(ROOT / "recipes/dpdm-mnist5k.yaml"), *TINY, "train.max_steps=2", "--out", str(out), "--quiet"]
        )
        == 0
    )
    return out


def test_every_attack_writes_its_result_and_roc(tiny_run, capsys):
    assert main(["attack", str(tiny_run), "--attack", "all", "--n-per-role", "40", "--quiet"]) == 0
    printed = capsys.readouterr().out
    splits = json.loads((tiny_run / "splits.json").read_text())
    assert splits["roles"]["member_test"]["split"] == "train" and splits["roles"]["nonmember_test"]["split"] == "test"
    ledger = json.loads((tiny_run / "ledger.json").read_text())
    assert (
        splits["roles"]["member_aux"]["fingerprint"] == ledger["dataset"]["fingerprint"]
    )  # members = what DP-SGD touched
    for name in ("loss", "secmi", "pia", "pian", "proxy", "proxy-loss"):
        r = json.loads((tiny_run / "attacks" / f"{name}.json").read_text())
        assert {"auc", "asr", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "n_members", "n_nonmembers", "roc_png"} <= set(r)
        assert r["n_members"] == r["n_nonmembers"] == 40 and 0 <= r["auc"] <= 1
        assert r["tpr_at_1pct_fpr"] is None and r["tpr_at_0.1pct_fpr"] is None  # 1/40 > 1%: not resolvable, not 0
        assert (tiny_run / "attacks" / r["roc_png"]).read_bytes().startswith(b"\x89PNG")
        assert name in printed
    assert "not resolvable" in printed
    # the report page shows them
    from privdiff.evaluation.report import _attacks_section
    from privdiff.runs import Run

    html = _attacks_section(Run(tiny_run))
    assert "secmi" in html and "not resolvable" in html and "<img" in html


def test_unused_nonmembers_make_low_fpr_measurable(tiny_run, capsys):
    """Scoring 200 of the test split's examples in no role as well: TPR at 1% FPR becomes resolvable."""
    splits = json.loads((tiny_run / "splits.json").read_text())
    assert main(["attack", str(tiny_run), "--attack", "loss", "--unused-nonmembers", "200", "--quiet"]) == 0
    r = json.loads((tiny_run / "attacks" / "loss.json").read_text())
    assert r["n_members"] == len(splits["roles"]["member_test"]["indices"])
    assert r["n_nonmembers"] == len(splits["roles"]["nonmember_test"]["indices"]) + 200
    assert r["splits"]["scored"] == ["member_test", "nonmember_test+unused"]
    assert r["tpr_at_1pct_fpr"] is not None and 0 <= r["tpr_at_1pct_fpr"] <= 1


def test_bad_input_is_one_line_and_exit_2(tiny_run, tmp_path, capsys):
    assert main(["attack", str(tmp_path / "nothing"), "--attack", "loss"]) == 2
    assert (
        main(["attack", str(tiny_run), "--attack", "loss", "--n-per-role", "7"]) == 2
    )  # splits already recorded with 40
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("privdiff: error:") for e in err)
    with pytest.raises(SystemExit):
        main(["attack", str(tiny_run), "--attack", "nope"])
