import math
import os
from pathlib import Path

import pytest

from privdiff.config import Recipe, RecipeError, parse_overrides, recipe_to_dict, resolve_recipe


def test_defaults_and_dotted_overrides():
    r = resolve_recipe(
        None,
        [
            "privacy.epsilon=1",
            "train.batch_size=512",
            "model.channels=[16,32]",
            "model.attention_levels=[1]",
            "train.max_steps=null",
        ],
    )
    assert r.privacy.epsilon == 1.0 and isinstance(r.privacy.epsilon, float)
    assert r.train.batch_size == 512 and r.model.channels == (16, 32) and r.train.max_steps is None
    assert r.privacy.delta == Recipe().privacy.delta


def test_unknown_key_is_an_error_not_ignored():
    with pytest.raises(RecipeError, match="unknown recipe key 'privacy.epsilonn'"):
        resolve_recipe(None, ["privacy.epsilonn=1"])
    with pytest.raises(RecipeError, match="unknown recipe key 'trian'"):
        resolve_recipe({"trian": {"batch_size": 3}})


def test_wrong_type_and_range_are_errors():
    with pytest.raises(RecipeError, match="train.batch_size: expected int"):
        resolve_recipe(None, ["train.batch_size=abc"])
    with pytest.raises(RecipeError, match="privacy.enabled: expected bool"):
        resolve_recipe(None, ["privacy.enabled=3"])
    with pytest.raises(RecipeError, match="privacy.delta"):
        resolve_recipe(None, ["privacy.delta=2"])
    with pytest.raises(RecipeError, match="key=value"):
        parse_overrides(["privacy.epsilon"])


def test_round_trip_through_dict():
    r = resolve_recipe(None, ["sampler.S_max=inf", "data.root=/x"])
    assert resolve_recipe(recipe_to_dict(r)) == r
    assert math.isinf(r.sampler.S_max)


def test_shipped_recipes_resolve():
    from importlib import resources

    names = sorted(p.name for p in (resources.files("privdiff") / "recipes").iterdir() if p.name.endswith(".yaml"))
    assert {
        "dpdm-mnist5k.yaml",
        "dpdm-mnist5k-eps1.yaml",
        "dpdm-mnist5k-nonprivate.yaml",
        "dp-ldm-mnist5k.yaml",
        "dp-ldm-mnist5k-eps1.yaml",
    } <= set(names)
    for n in names:
        resolve_recipe(str(resources.files("privdiff") / "recipes" / n))


def test_dp_ldm_recipe_keys():
    r = resolve_recipe("recipes/dp-ldm-mnist5k.yaml", ["ldm.trainable=[cross_attention]", "ldm.pretrain.epochs=3"])
    assert r.method == "dp-ldm" and r.ldm.trainable == ("cross_attention",) and r.ldm.pretrain.epochs == 3
    assert r.ldm.pretrain.batch_size == 128  # the public stage has its own defaults, not train's
    with pytest.raises(RecipeError, match="must not be the private data set"):
        resolve_recipe("recipes/dp-ldm-mnist5k.yaml", ["ldm.public_data=mnist5k"])
    with pytest.raises(RecipeError, match="unknown recipe key"):
        resolve_recipe("recipes/dp-ldm-mnist5k.yaml", ["ldm.unet.attention_head_dim=8"])


def test_public_warm_start_keys():
    """dpdm.* / dpp.public_*: on only in the demo's recipes (the proxy search's winner, issue 20), off in every
    other shipped recipe; a public set is never the private one; its size and pretraining are checked like
    every other key."""
    from privdiff.cli import DEMO_RECIPE

    warm = {DEMO_RECIPE, f"{DEMO_RECIPE}-eps1"}
    for path in sorted(Path("recipes").glob("*.yaml")):
        r = resolve_recipe(str(path))
        assert r.dpp.public_data is None, path
        assert (r.dpdm.public_data == "glyphs") == (path.stem in warm), path
    demo, eps1 = (resolve_recipe(f"recipes/{name}.yaml") for name in sorted(warm))
    assert (demo.method, demo.data.name, demo.privacy.epsilon, eps1.privacy.epsilon) == ("dpdm", "mnist5k", 10.0, 1.0)
    assert dataclasses.replace(eps1, privacy=demo.privacy) == demo  # the eps=1 twin differs in its budget only
    # the eps=1 recipe (the proxy's winner there): DP-LDM's, its public stages on 3,000 glyphs, drawn at its own w
    ldm = resolve_recipe("recipes/dp-ldm-glyphs-mnist5k-eps1.yaml")
    glyphs = ["ldm.public_data=glyphs", "ldm.public_size=3000", "ldm.public_margin=0", "ldm.public_contrast=0"]
    w = f"sampler.guidance={ldm.sampler.guidance}"
    assert resolve_recipe("recipes/dp-ldm-mnist5k-eps1.yaml", [*glyphs, w]) == ldm
    r = resolve_recipe("recipes/dpdm-mnist5k.yaml", ["dpdm.public_data=glyphs", "dpdm.pretrain.epochs=3"])
    assert r.dpdm.public_data == "glyphs" and r.dpdm.pretrain.epochs == 3 and r.dpdm.pretrain.batch_size == 128
    for recipe, key in (("dpdm-mnist5k", "dpdm.public_data"), ("dpp-mnist5k", "dpp.public_data")):
        with pytest.raises(RecipeError, match=f"{key} must not be the private data set"):
            resolve_recipe(f"recipes/{recipe}.yaml", [f"{key}=mnist5k"])
    for bad in ("dpdm.public_size=0", "dpp.public_margin=-1", "dpdm.pretrain.lr=0", "dpp.public_pretrain.epochs=0"):
        with pytest.raises(RecipeError):
            resolve_recipe("recipes/dpdm-mnist5k.yaml", [bad])


# -- issue 22: duplicate keys, scalar sections, ranges -------------------------------------------------

import dataclasses  # noqa: E402
import typing  # noqa: E402

from privdiff.config import RANGES, Bound, parse_value, validate_recipe  # noqa: E402


@pytest.mark.parametrize(
    "text, says",
    [
        ("privacy: {epsilon: 1}\nprivacy: {epsilon: 50}\n", "duplicate key 'privacy'"),
        ("privacy:\n  epsilon: 1\n  delta: 1.0e-5\n  epsilon: 50\n", "duplicate key 'epsilon'"),
        ("ldm:\n  autoencoder:\n    lr: 1.0e-3\n    lr: 5.0e-3\n", "duplicate key 'lr'"),
        ("method: dpdm\nmethod: dpp\n", "duplicate key 'method'"),
    ],
)
def test_a_key_given_twice_in_a_recipe_is_an_error(tmp_path, text, says):
    """`privacy: {epsilon: 1}` then `privacy: {epsilon: 50}` used to train at 50: the last one silently won."""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=says) as e:
        resolve_recipe(path)
    assert "line" in str(e.value) and "\n" not in str(e.value)


def test_a_yaml_merge_key_may_still_override_what_it_merges(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("privacy: &p {epsilon: 1.0}\nsampler: {steps: 8}\n")
    assert resolve_recipe(path).privacy.epsilon == 1.0


@pytest.mark.parametrize(
    "text, overrides",
    [
        ("privacy: 5\n", []),
        ("privacy: 5\n", ["privacy.epsilon=3"]),
        ("privacy:\n", []),
        ("train: [1, 2]\n", ["train.lr=0.1"]),
        ("ldm: {autoencoder: 3}\n", ["ldm.autoencoder.lr=0.1"]),
    ],
)
def test_a_section_given_as_a_scalar_is_an_error(tmp_path, text, overrides):
    """Even when an override names a key inside it (the scalar used to be replaced silently)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match="expected a section"):
        resolve_recipe(path, overrides)
    with pytest.raises(RecipeError):
        resolve_recipe(None, ["privacy=5"])


@pytest.mark.parametrize(
    "override",
    [
        "privacy.max_grad_norm=inf",
        "privacy.epsilon=inf",
        "privacy.epsilon=.inf",
        "privacy.epsilon=nan",
        "privacy.epsilon=0",
        "privacy.epsilon=1e400",
        "privacy.delta=1",
        "privacy.delta=0",
        "privacy.delta=2",
        "privacy.delta=-1e-5",
        "train.lr=inf",
        "train.lr=0",
        "train.lr=-1e-3",
        "sampler.guidance=.nan",
        "sampler.guidance=inf",
        "sampler.guidance=-1",
        "train.epochs=inf",
        "train.epochs=0",
        "train.checkpoint_every=0",
        "train.batch_size=0",
        "train.batch_size=-5",
        "train.max_steps=0",
        "train.seed=-1",
        "model.channels=[]",
        "model.channels=[0]",
        "model.layers_per_block=0",
        "model.dropout=1",
        "privacy.noise_multiplicity=0",
        "diffusion.label_dropout=1.5",
        "diffusion.P_std=0",
        "sampler.steps=0",
        "sampler.sigma_min=0",
        "sampler.sigma_max=inf",
        "sampler.S_max=nan",
        "sampler.rho=0",
        "evaluate.n_samples=1",
        "evaluate.holdout=1",
        "evaluate.kid_subset_size=1",
        "ldm.autoencoder.lr=nan",
        "ldm.pretrain.epochs=inf",
        "ldm.text.caption_dropout=1",
        "dpp.noise_multiplier=inf",
        "dpp.magnitude=11",
        "dpp.pretrain.batch_size=0",
        "lora.rank=0",
        "lora.stabilizer=0",
        "lora.pretrain.lr=inf",
        "ldm.he.blocks=0",
        # values that would only fail when the network is built, mid-start
        "model.channels=[6,16]",
        "model.attention_head_dim=64",
        "model.attention_levels=[5]",
        "data.resolution=27",
        # malformed values
        "train.batch_size=[1,",
        "train.batch_size=1.5",
        "privacy.epsilon={a: 1",
        "privacy.epsilon=abc",
        "model.channels={a: 1}",
    ],
)
def test_every_numeric_value_out_of_its_range_is_an_error(override):
    with pytest.raises(RecipeError) as e:
        resolve_recipe("recipes/dpdm-mnist5k.yaml", [override])
    assert "\n" not in str(e.value)


def test_numbers_with_an_exponent_are_floats_as_in_yaml_1_2(tmp_path):
    """YAML 1.1 reads 1e-5 as the string "1e-5" (it used to be refused as a float)."""
    r = resolve_recipe(
        None,
        [
            "privacy.delta=1e-5",
            "train.lr=3E-4",
            "privacy.epsilon=1e1",
            "train.batch_size=1e2",
            "sampler.sigma_max=8.0e1",
        ],
    )
    assert (r.privacy.delta, r.train.lr, r.privacy.epsilon, r.train.batch_size, r.sampler.sigma_max) == (
        1e-5,
        3e-4,
        10.0,
        100,
        80.0,
    )
    assert isinstance(r.train.batch_size, int)
    path = tmp_path / "recipe.yaml"
    path.write_text("privacy:\n  delta: 1e-6\ntrain:\n  lr: 2e-3\n")
    r = resolve_recipe(path)
    assert (r.privacy.delta, r.train.lr) == (1e-6, 2e-3)
    assert resolve_recipe(None, ["data.root=1e5x"]).data.root == os.path.abspath(
        "1e5x"
    )  # not a number: a path as before


def _numeric_keys(cls=Recipe, prefix=""):
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _numeric_keys(hint, f"{prefix}{f.name}.")
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        base = typing.get_args(args[0])[0] if typing.get_origin(args[0]) is tuple else args[0]
        if base in (int, float):
            yield f"{prefix}{f.name}"


def test_every_numeric_recipe_key_has_a_range():
    """The class, not the examples: a numeric key added later without a range fails here."""
    keys = set(_numeric_keys())
    assert keys - set(RANGES) == set(), "numeric recipe keys without a range in privdiff.config.RANGES"
    assert set(RANGES) - keys == set(), "RANGES names keys that are not numeric recipe keys"
    validate_recipe(Recipe())  # the defaults are in range
    for key, bound in RANGES.items():  # and no range lets NaN through
        with pytest.raises(RecipeError):
            bound.check(key, math.nan)


def test_bounds_and_command_line_values():
    assert Bound(lo=0, lo_open=True).describe() == "> 0"
    assert Bound(lo=0, hi=1, lo_open=True, hi_open=True).describe() == "in (0, 1)"
    with pytest.raises(RecipeError, match=r"privacy.epsilon must be a finite number > 0, got inf"):
        parse_value("privacy.epsilon", "inf")
    with pytest.raises(RecipeError, match="sampler.guidance must be a finite number"):
        parse_value("sampler.guidance", "nan")
    with pytest.raises(RecipeError, match="unknown recipe key"):
        parse_value("sampler.guidence", "1")
    assert parse_value("privacy.delta", "1e-6") == 1e-6 and parse_value("sampler.steps", "12") == 12


def test_data_split_keys_and_absolute_roots(tmp_path, monkeypatch):
    """data.holdout / holdout_seed / test_root for data without a test split; data.root and data.test_root are
    stored absolute (~ expanded), so a run's saved config names the same files from any directory."""
    import random

    recipe = Path(__file__).resolve().parents[1] / "recipes/dpdm-mnist5k.yaml"
    seed, fraction = random.randrange(2**31), round(random.uniform(0.05, 0.95), 3)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    r = resolve_recipe(
        None, ["data.name=folder", "data.root=~/flowers", f"data.holdout={fraction}", f"data.holdout_seed={seed}"]
    )
    assert (r.data.root, r.data.holdout, r.data.holdout_seed, r.data.test_root) == (
        str(tmp_path / "home/flowers"),
        fraction,
        seed,
        None,
    )
    r = resolve_recipe(None, ["data.name=folder", "data.root=flowers", "data.test_root=../test.zip"])
    assert (r.data.root, r.data.test_root) == (str(tmp_path / "flowers"), str(tmp_path.parent / "test.zip"))
    monkeypatch.chdir(tmp_path.parent)
    assert resolve_recipe(recipe_to_dict(r)) == r  # a saved config reads back unchanged from elsewhere
    for bad, says in [
        (["data.holdout=0.2"], "mnist5k has a test split of its own"),
        (["data.name=folder", "data.holdout=0.2", "data.test_root=t"], "not both"),
        (["data.name=folder", "data.holdout=1"], "data.holdout"),
        (["data.name=folder", "data.holdout=0"], "data.holdout"),
        (["data.holdout_seed=-1"], "data.holdout_seed"),
        (["evaluate.features=inception"], "evaluate.features must be one of public, photos, train"),
    ]:
        with pytest.raises(RecipeError, match=says) as e:
            resolve_recipe(recipe, bad)
        assert "\n" not in str(e.value)
