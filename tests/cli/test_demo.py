"""`privdiff demo` trains the public proxy search's winner (issue 20): a public warm start on glyphs, then DP-SGD
on mnist5k; the ledger names the public stage and composes the private one only. Tiny model, two steps each."""

import json

from privdiff.cli import DEMO_RECIPE, main


def test_demo_runs_its_recipe_with_the_public_warm_start_in_the_ledger(tmp_path, tiny_overrides, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    overrides = [*tiny_overrides, "dpdm.public_size=40", "dpdm.pretrain.max_steps=2", "train.max_steps=2"]
    assert main(["demo", "--out", "run", *overrides]) == 0
    out, err = capsys.readouterr()
    assert f"privdiff demo: {DEMO_RECIPE}:" in err
    assert "(diffusers UNet2DModel.from_pretrained)" in out  # the summary names the class that loads it
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    (public,) = ledger["public_stages"]
    assert public["stage"] == "pretrain" and public["data"]["name"] == "glyphs" and public["steps"] == 2
    assert public["data"]["size"] == 40 + 1000  # its train split as asked, and its test split
    assert sum(e["steps"] for e in ledger["events"]) == 2  # only the DP-SGD steps compose into epsilon
    assert (tmp_path / "run" / "samples" / "grid.png").is_file()
