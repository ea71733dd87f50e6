"""Public pretraining shared by content hash: DPDM's warm start (PDP-Diffusion), DPP's, and the cache they share.

Every run here is a micro DPDM/DPP (4×4 scikit-learn digits as the private set, 50 + 1,000 rendered glyphs as
the public one) through the command line, with its own ``$PRIVDIFF_CACHE``. Whether a run trained its public
stage or took it from the cache is read from its train log: a stage taken from the cache is logged with
``"cached": true`` and no new entry appears in the cache. How the cache is keyed (every change retrains) and
what a damaged entry does: ``tests/core/test_pretrain_cache.py``.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from privdiff.cli import main
from privdiff.privacy.accounting import epsilon
from privdiff.runs import Run
from tests.helpers import MICRO

pytestmark = pytest.mark.usefixtures("deterministic_kernels")

PRIVATE = [*MICRO, "train.max_steps=1"]
WARM = [
    "dpdm.public_data=glyphs",
    "dpdm.public_size=50",
    "dpdm.public_margin=0",
    "dpdm.public_contrast=0",
    "dpdm.pretrain.batch_size=16",
    "dpdm.pretrain.max_steps=4",
]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("PRIVDIFF_CACHE", str(path))
    return path


def _train(out: Path, *overrides: str, recipe: str = "dpdm-mnist5k", capsys=None) -> Path:
    code = main(["train", recipe, *PRIVATE, *overrides, "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err if capsys else code
    return out


def _stage_log(run: Path, stage: str = "pretrain") -> list[dict]:
    return [e for e in Run(run).read_train_log() if e["stage"] == stage]


def _trained(run: Path, stage: str = "pretrain") -> bool:
    """The run trained its public stage itself (True) or took it from the cache (False)."""
    log = _stage_log(run, stage)
    assert [e["step"] for e in log] == [1, 2, 3, 4]  # the stage is in the run's log either way
    cached = {bool(e.get("cached")) for e in log}
    assert len(cached) == 1
    return not cached.pop()


def _entries(cache: Path) -> set[str]:
    root = cache / "pretrain"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def _weights(run: Path, stage: str = "pretrain") -> list[torch.Tensor]:
    return list(Run(run / "stages" / stage).load_net(ema=True).state_dict().values())


def test_warm_started_dpdm_names_the_public_stage_composes_only_the_private_one_and_shares_it(tmp_path, cache, capsys):
    """Cold DPDM, warm DPDM (PDP-Diffusion: trains the public stage), warm DPP (takes DPDM's stage from the cache)."""
    cold = json.loads((_train(tmp_path / "cold", capsys=capsys) / "ledger.json").read_text())
    run = _train(tmp_path / "warm", *WARM, capsys=capsys)
    assert _trained(run) and len(_entries(cache)) == 1
    warm = json.loads((run / "ledger.json").read_text())
    assert cold["public_stages"] == []
    [public] = warm["public_stages"]
    assert public["stage"] == "pretrain" and public["steps"] == 4
    assert public["data"]["name"] == "glyphs" and public["data"]["size"] == 1050  # 50 train + 1,000 test glyphs
    assert [e["stage"] for e in warm["events"]] == ["dp_sgd"]
    assert warm["events"] == cold["events"]  # the same private mechanism as a cold start...
    hist = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in warm["events"]]
    assert warm["epsilon"] == pytest.approx(epsilon(hist, delta=warm["delta"]))  # ...and epsilon is its alone
    assert warm["epsilon"] == cold["epsilon"] and warm["dataset"] == cold["dataset"]
    # the private stage started from the public EMA weights, which stay in the run (loadable, resumable)
    pretrained = Run(run / "stages" / "pretrain").load_net(ema=True)
    assert not torch.equal(next(pretrained.parameters()), next(Run(tmp_path / "cold").load_net().parameters()))
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["dpdm"]["public_data"] == "glyphs" and config["dpdm"]["pretrain"]["max_steps"] == 4
    # DPP's warm start on the same public data, model and pretraining is the same stage: taken from the cache
    dpp_warm = [w.replace("dpdm.pretrain.", "dpp.public_pretrain.").replace("dpdm.", "dpp.") for w in WARM]
    tiny_dpp = ["dpp.copies=2", "dpp.rounds=1", "dpp.pretrain.batch_size=8", "dpp.pretrain.max_steps=2"]
    dpp = _train(tmp_path / "dpp", *dpp_warm, *tiny_dpp, recipe="dpp-mnist5k", capsys=capsys)
    assert not _trained(dpp, "public_pretrain") and len(_entries(cache)) == 1
    assert all(torch.equal(x, y) for x, y in zip(_weights(run), _weights(dpp, "public_pretrain")))
    ledger = json.loads((dpp / "ledger.json").read_text())
    assert [p["stage"] for p in ledger["public_stages"]] == ["public_pretrain"]
    assert ledger["public_stages"][0]["data"] == public["data"]
    assert [e["stage"] for e in ledger["events"]] == ["central_images", "dp_sgd"]
    hist = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in ledger["events"]]
    assert ledger["epsilon"] == pytest.approx(epsilon(hist, delta=ledger["delta"]))
    # the central-image stage (derived from a release) starts from the public weights and is never cached
    assert [(e["step"], bool(e.get("cached"))) for e in _stage_log(dpp, "pretrain")] == [(1, False), (2, False)]
    assert len(_entries(cache)) == 1


def _folder(root: Path, names: list[str], per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize(
    "names, says",
    [(["0", "1"], "they must match"), ([f"c{i}" for i in range(10)], "must be the same classes")],
    ids=["count", "names"],
)
def test_public_classes_that_are_not_the_private_ones_are_refused_before_anything_is_written(
    tmp_path, cache, capsys, names, says
):
    root = _folder(tmp_path / "private", names)
    out = tmp_path / "run"
    code = main(
        ["train", "dpdm-mnist5k", *PRIVATE, "data.name=folder", f"data.root={root}", "train.batch_size=2", *WARM]
        + ["--out", str(out), "--quiet"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "dpdm.public_data=glyphs" in err and says in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and not _entries(cache)


def test_a_warm_started_run_resumes_without_the_cache(tmp_path, cache, capsys):
    """The run holds its public stage itself: with the cache deleted it resumes the private stage, trains nothing
    public again, and its ledger keeps one public stage and counts the private steps once."""
    run = _train(tmp_path / "run", *WARM, capsys=capsys)
    public_log = _stage_log(run)
    before = json.loads((run / "ledger.json").read_text())
    shutil.rmtree(cache / "pretrain")
    _train(run, *WARM, "train.max_steps=2", capsys=capsys)
    after = json.loads((run / "ledger.json").read_text())
    assert after["public_stages"] == before["public_stages"]
    assert [(e["stage"], e["steps"]) for e in after["events"]] == [("dp_sgd", 2)]
    assert _stage_log(run) == public_log  # nothing public ran again
