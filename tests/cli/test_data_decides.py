"""The data decides what it can (issue 23, item 3): a folder trains at its own size and channels unless
data.resolution says otherwise, the start line says what trains (and where a run resumes), a folder of
mixed sizes is refused in one line before anything is written, and the class names are kept in the run so
that ``privdiff sample --label NAME`` works. Also ``train --no-grid`` and the sampling bar (item 5).
Fresh random PNGs, tiny models."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from privdiff.cli import main
from privdiff.config import recipe_to_dict, resolve_recipe
from privdiff.core.generation import class_index, generate
from privdiff.core.denoisers import load_denoiser
from privdiff.runs import Run
from tests.helpers import image_folder

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes/dpdm-mnist5k.yaml")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng()


def test_a_recipe_resolution_belongs_to_its_data(tmp_path):
    demo = resolve_recipe(RECIPE)
    assert demo.data.resolution == 16 and demo.data.name == "mnist5k"  # the demo is unchanged
    assert resolve_recipe(RECIPE, ["privacy.epsilon=1"]).data.resolution == 16
    assert resolve_recipe(RECIPE, ["data.name=mnist5k"]).data.resolution == 16  # the same data: the same size
    other = ["data.name=folder", f"data.root={tmp_path}"]
    assert resolve_recipe(RECIPE, other).data.resolution is None  # other data: its own size
    assert resolve_recipe(RECIPE, [*other, "data.resolution=32"]).data.resolution == 32  # an override wins
    assert resolve_recipe(RECIPE, ["data.resolution=32", *other]).data.resolution == 32
    saved = recipe_to_dict(resolve_recipe(RECIPE, [*other, "data.resolution=8"]))
    assert resolve_recipe(saved).data.resolution == 8  # a run's config.yaml is taken as it is


def test_a_folder_of_mixed_sizes_needs_a_resolution(tmp_path, tiny_overrides, rng, capsys):
    folder = image_folder(tmp_path / "mixed", rng, classes={"a": 3, "b": 3})
    Image.fromarray(rng.integers(0, 256, size=(12, 12), dtype=np.uint8)).save(folder / "b" / "odd.png")
    tiny = [o for o in tiny_overrides if not o.startswith("data.resolution")]
    run = tmp_path / "run"
    code = main(["train", RECIPE, *tiny, "data.name=folder", f"data.root={folder}", "--out", str(run), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "mixed sizes" in err[0] and "data.resolution=" in err[0], err
    assert not run.exists()


@pytest.mark.slow
def test_a_colour_folder_trains_at_its_own_size_and_samples_by_class_name(
    tmp_path, tiny_overrides, rng, monkeypatch, capsys
):
    folder = image_folder(tmp_path / "flowers", rng, classes={"rose": 5, "daisy": 5}, mode="RGB", size=16)
    tiny = [o for o in tiny_overrides if not o.startswith("data.resolution")]  # the data decides
    run = tmp_path / "run"
    common = ["train", RECIPE, *tiny, "train.batch_size=4", "data.name=folder", f"data.root={folder}", "--out"]
    assert main([*common, str(run), "train.max_steps=1", "train.checkpoint_every=1", "--no-grid"]) == 0
    out, err = capsys.readouterr()
    line = next(ln for ln in err.splitlines() if ln.startswith("dp_sgd: "))
    for part in ("16x16", "3 channels", "N=10", "2 classes", "planned steps", "sigma=", "starts at step 0"):
        assert part in line, line
    assert "--no-grid" in out and not (run / "samples").exists()  # no grid drawn, the result still reported
    assert Run(run).class_names() == ("daisy", "rose")

    assert main([*common, str(run), "train.max_steps=2", "train.checkpoint_every=1", "--no-grid"]) == 0
    line = next(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("dp_sgd: "))
    assert "resumes from step 1" in line, line

    seed = int(rng.integers(0, 2**31))
    for label, index in (("rose", 1), ("0", 0)):
        npz = tmp_path / f"{label}.npz"
        assert main(["sample", str(run), "--n", "3", "--label", label, "--seed", str(seed), "--out", str(npz)]) == 0
        got = np.load(npz)
        assert got["images"].shape == (3, 3, 16, 16) and (got["labels"] == index).all()
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "3", "--label", "tulip", "--quiet", "--out", str(tmp_path / "t.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "daisy, rose" in err[0] and "tulip" not in err[0], err

    # the sampling bar moves with every sampler step, and drawing with it gives the same images
    recipe = Run(run).load_config()
    denoiser = load_denoiser(Run(run), recipe)
    labels = torch.tensor([0, 1, 1])
    ticks = []

    class Bar:
        n = 0

        def __init__(self, *, total, disable, **_):
            self.total, self.disable = total, disable

        def update(self, k=1):
            self.n += k
            ticks.append(k)

        def set_postfix(self, **_):
            pass

        def close(self):
            pass

    monkeypatch.setattr("privdiff.core.generation.tqdm", Bar)
    quiet = generate(denoiser, labels=labels, n=3, recipe=recipe, seed=seed, batch_size=2, progress=False)
    ticks.clear()
    shown = generate(denoiser, labels=labels, n=3, recipe=recipe, seed=seed, batch_size=2, progress=True)
    assert np.array_equal(quiet, shown)
    steps = recipe.sampler.steps
    assert ticks.count(1) >= 2 * steps - 2 and sum(ticks) == 2 * steps  # per step of each of the 2 batches


def test_class_index_by_name_or_index():
    names = ("10", "2", "daisy")
    assert class_index("daisy", num_classes=3, class_names=names) == 2
    assert class_index("2", num_classes=3, class_names=names) == 1  # a name before an index
    assert class_index("0", num_classes=3, class_names=names) == 0 and class_index(2, num_classes=3) == 2
    with pytest.raises(ValueError, match=r"a name \(10, 2, daisy\) or an index in \[0, 3\)"):
        class_index("rose", num_classes=3, class_names=names)
    with pytest.raises(ValueError, match="kept no class names"):
        class_index("7", num_classes=3)
    with pytest.raises(ValueError, match="unconditional"):
        class_index("0", num_classes=None)
