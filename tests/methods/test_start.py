"""The start of a run: everything is checked before it writes anything or reserves budget, and a start
that still fails removes exactly what it created (files, lock, directory, registry reservation)."""

import os

import pytest

from privdiff.cli import main
from privdiff.config import resolve_recipe
from privdiff.data import load_dataset
from privdiff.privacy.budget import open_ledger
from privdiff.privacy.registry import Registry
from privdiff.runs import open_run
from tests.helpers import MICRO as MICRO_BASE

pytestmark = pytest.mark.slow

MICRO = [*MICRO_BASE, "train.max_steps=2"]


def _registered_runs() -> list:
    return [r for s in Registry(os.environ["PRIVDIFF_REGISTRY"]).status() for r in s.runs]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("privdiff: error: ") and "Traceback" not in err, err
    return lines[0]


LATE_ERRORS = [  # (recipe, overrides, what the one-line error says)
    ("dpdm-mnist5k", ["model.norm_num_groups=3"], "divisible"),  # the UNet constructor rejects it
    ("dpdm-mnist5k", ["train.batch_size=5000"], "larger than its data set"),
    ("dpdm-mnist5k", ["data.name=mnist", "data.root={tmp}/nowhere"], "nowhere"),  # a missing data.root
    (
        "dpp-mnist5k",
        ["dpp.copies=1", "dpp.rounds=1", "dpp.pretrain.batch_size=64"],
        "pretrain",
    ),  # found only after the release, before
    ("dp-ldm-mnist5k", ["ldm.trainable=[no_such_group]"], "no_such_group"),
    ("dp-ldm-mnist5k", ["ldm.unet.norm_num_groups=7"], "divisible"),
    ("lora-mnist5k", ["lora.targets=[no_such_layer]"], "no_such_layer"),
]


@pytest.mark.parametrize("recipe,overrides,says", LATE_ERRORS)
def test_a_recipe_error_found_late_touches_neither_disk_nor_registry(tmp_path, capsys, recipe, overrides, says):
    fresh, existing = tmp_path / "fresh" / "run", tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    for out in (fresh, existing) if recipe == "dpdm-mnist5k" else (fresh,):
        data = (
            MICRO[:1] if recipe.startswith("dp") and recipe != "dp-ldm-mnist5k" else []
        )  # ldm/lora: public data is digits
        argv = ["train", recipe, *data, *[o.format(tmp=tmp_path) for o in overrides], "--out", str(out), "--quiet"]
        assert main(argv) == 2
        assert says in _one_line(capsys)
    assert not (tmp_path / "fresh").exists()
    assert sorted(os.listdir(existing)) == ["notes.txt"]  # no config.yaml, ledger.json, .lock (nor anything else)
    assert _registered_runs() == []


def test_a_refused_start_removes_what_it_wrote(tmp_path, capsys):
    """Refused by the registry's cap after config.yaml, .lock and ledger.json were written: all of it goes."""
    registry = os.environ["PRIVDIFF_REGISTRY"]
    assert main(["budget", "cap", "dpdm-mnist5k", *MICRO[:2], "--epsilon", "0.5", "--registry", registry]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(["train", "dpdm-mnist5k", *MICRO, "--out", str(out), "--quiet"]) == 2
    assert "over its cap" in _one_line(capsys)
    assert not out.exists()
    assert _registered_runs() == []


def test_a_start_that_fails_after_its_reservation_withdraws_it(tmp_path):
    """A failure (here a KeyboardInterrupt) after the ledger was admitted, before any work: the reservation is
    withdrawn and the files go; the user's file in the directory stays, and so does the directory."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    recipe = resolve_recipe("recipes/dpdm-mnist5k.yaml" if os.path.exists("recipes/dpdm-mnist5k.yaml") else None, MICRO)
    dataset = load_dataset(recipe.data.name, root=recipe.data.root, split="train", resolution=recipe.data.resolution)
    run = open_run(out, recipe)
    with pytest.raises(KeyboardInterrupt):
        with run.starting():
            ledger = open_ledger(run, recipe, dataset)
            assert [r.run_id for r in _registered_runs()] == [ledger.run_id]  # reserved
            raise KeyboardInterrupt
    assert _registered_runs() == []
    assert sorted(os.listdir(out)) == ["notes.txt"]
    # and the same directory then trains normally (its lock was released with the undo)
    run = open_run(out, recipe)
    with run.starting():
        open_ledger(run, recipe, dataset)
    assert len(_registered_runs()) == 1 and (out / "config.yaml").is_file()
