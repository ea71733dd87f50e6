"""DPP end to end through the command line (tiny): release, pretraining, DP-SGD, one composed ε."""

import json
from pathlib import Path

import numpy as np
import pytest

from privdiff.cli import main
from privdiff.privacy.accounting import epsilon
from tests.helpers import dp_accounting_rdp

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_dpp_releases_pretrains_fine_tunes_and_composes_one_epsilon(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "dpp"
    args = [
        "train",
        str(ROOT / "recipes/dpp-mnist5k.yaml"),
        *tiny_overrides,
        "privacy.epsilon=2",
        "dpp.copies=4",
        "dpp.rounds=2",
        "dpp.pretrain.max_steps=3",
        "dpp.pretrain.batch_size=32",
        "train.max_steps=3",
        "--out",
        str(run),
        "--quiet",
    ]
    assert main(args) == 0, capsys.readouterr().err
    ledger = json.loads((run / "ledger.json").read_text())
    release, dpsgd = ledger["events"]
    assert release["stage"] == "central_images" and release["steps"] == 2 and release["sensitivity"] > 0
    assert dpsgd["stage"] == "dp_sgd" and dpsgd["steps"] == 3
    hist = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in ledger["events"]]
    assert ledger["epsilon"] == pytest.approx(epsilon(hist, delta=ledger["delta"]))
    assert ledger["epsilon"] == pytest.approx(dp_accounting_rdp(hist, delta=ledger["delta"]), rel=1e-3)
    assert ledger["epsilon"] <= 2.0
    central = np.load(run / "central" / "central.npz")
    assert central["images"].shape == (20, 1, 8, 8) and (run / "central" / "grid.png").is_file()
    assert 0 <= central["images"].min() and central["images"].max() <= 1
    # a rerun resumes: the release is read back, not run (and counted) again
    assert main(args) == 0
    assert json.loads((run / "ledger.json").read_text())["events"][0]["steps"] == 2
