import math

import pytest

from privdiff.config import Recipe, RecipeError, parse_overrides, recipe_to_dict, resolve_recipe


def test_defaults_and_dotted_overrides():
    r = resolve_recipe(None, ["privacy.epsilon=1", "train.batch_size=512", "model.channels=[16,32]", "train.max_steps=null"])
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
    assert {"dpdm-mnist5k.yaml", "dpdm-mnist5k-eps1.yaml", "dpdm-mnist5k-nonprivate.yaml", "dp-ldm-mnist5k.yaml", "dp-ldm-mnist5k-eps1.yaml"} <= set(names)
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
