"""The content-hash cache of public pretraining (:mod:`privdiff.core.pretrain_cache`) through the one public stage,
:func:`privdiff.core.stages.pretrain`, on a micro pixel UNet and random 4×4 "public" images.

Whether a stage trained or was taken from the cache is seen two ways that can each fail: the training loop's
steps are counted (a spy on the engine's step) and the train log's lines say ``"cached": true``."""

import dataclasses
import json

import pytest
import torch

import privdiff.core.training as training
from privdiff.config import PretrainConfig, resolve_recipe
from privdiff.core.pretrain_cache import stage_key
from privdiff.core.stages import pretrain
from privdiff.privacy.budget import data_identity
from privdiff.privacy.ledger import Ledger
from privdiff.runs import Run
from privdiff.runtime import cache_dir
from tests.helpers import toy_dataset

pytestmark = pytest.mark.usefixtures("deterministic_kernels")

MICRO_NET = [
    "model.channels=[4]",
    "model.attention_levels=[]",
    "model.norm_num_groups=2",
    "model.attention_head_dim=4",
]
STAGE = PretrainConfig(batch_size=8, epochs=1.0, max_steps=3, lr=2e-3, ema_decay=0.9)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVDIFF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "pretrain"


@pytest.fixture
def steps(monkeypatch) -> list[int]:
    """Every optimizer step the training loop takes (any stage), counted where the engine is made."""
    taken: list[int] = []
    make = training.make_engine

    def counting(*args, **kwargs):
        engine = make(*args, **kwargs)
        step = engine.step

        def counted(*a, **k):
            taken.append(1)
            return step(*a, **k)

        engine.step = counted
        return engine

    monkeypatch.setattr(training, "make_engine", counting)
    return taken


def _stage(out, recipe, data, *, train=STAGE, ledger=True, **kwargs):
    run = Run(out)
    run.path.mkdir(parents=True, exist_ok=True)
    book = (
        Ledger(delta=1e-5, accountant="rdp", dataset=data_identity(toy_dataset(8, seed=99, size=4))) if ledger else None
    )
    result = pretrain(run, recipe, data, train=train, ledger=book, progress=False, **kwargs)
    return result, book, run


def _cached(run) -> bool:
    log = [e for e in run.read_train_log() if e["stage"] == "pretrain"]
    assert [e["step"] for e in log] == [1, 2, 3]
    flags = {bool(e.get("cached")) for e in log}
    assert len(flags) == 1
    return flags.pop()


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.denoiser.state_dict().values(), b.denoiser.state_dict().values()))


def test_an_identical_stage_is_reused_and_every_change_retrains(tmp_path, cache, steps):
    r = resolve_recipe(None, MICRO_NET)
    data = toy_dataset(32, seed=1, size=4)
    first, ledger, run = _stage(tmp_path / "a", r, data)
    assert len(steps) == 3 and not _cached(run) and len(list(cache.iterdir())) == 1
    again, ledger2, run2 = _stage(tmp_path / "b", r, data)
    assert len(steps) == 3 and _cached(run2)  # no step taken
    assert _same(first, again) and again.steps == 3
    assert ledger2.public_stages == ledger.public_stages  # the ledger records the same either way
    assert Run(run2.path / "stages" / "pretrain").latest_checkpoint().name == "step-000003"  # the run's own copy
    # checkpoint_every changes nothing learned: reused
    _, _, run3 = _stage(tmp_path / "c", r, data, train=dataclasses.replace(STAGE, checkpoint_every=2))
    assert len(steps) == 3 and _cached(run3)
    changed_data = dataclasses.replace(data, images=data.images.flip(-1))  # same name, size, fingerprint: content
    changes = {
        "public images": (r, changed_data, STAGE),
        "public labels": (r, dataclasses.replace(data, labels=(data.labels + 1) % 10), STAGE),
        "public size": (r, toy_dataset(40, seed=1, size=4), STAGE),
        "model": (resolve_recipe(None, [*MICRO_NET, "model.channels=[6]"]), data, STAGE),
        "model depth": (resolve_recipe(None, [*MICRO_NET, "model.layers_per_block=3"]), data, STAGE),
        "lr": (r, data, dataclasses.replace(STAGE, lr=1e-3)),
        "batch": (r, data, dataclasses.replace(STAGE, batch_size=4)),
        "ema": (r, data, dataclasses.replace(STAGE, ema_decay=0.99)),
        "seed": (r, data, dataclasses.replace(STAGE, seed=5)),
        "epochs": (r, data, dataclasses.replace(STAGE, epochs=2.0)),
        "parameterization": (resolve_recipe(None, [*MICRO_NET, "diffusion.parameterization=v"]), data, STAGE),
        "sigma_data": (resolve_recipe(None, [*MICRO_NET, "diffusion.sigma_data=0.5"]), data, STAGE),
        "label dropout": (resolve_recipe(None, [*MICRO_NET, "diffusion.label_dropout=0.2"]), data, STAGE),
    }
    base = stage_key(r, data, train=STAGE)
    keys = {base.key}
    for what, (recipe, d, train) in changes.items():
        key = stage_key(recipe, d, train=train)
        assert key.key not in keys, what
        keys.add(key.key)
    assert base.description["version"] >= 1 and base.description["data"]["content_sha256"]
    assert stage_key(r, data, train=STAGE, extra={"caption_dropout": 0.1}).key != base.key
    # end to end, two of them: each trains, and is then kept beside the first
    for i, what in enumerate(("public images", "model")):
        recipe, d, train = changes[what]
        _, _, run_i = _stage(tmp_path / f"changed{i}", recipe, d, train=train)
        assert len(steps) == 3 * (i + 2) and not _cached(run_i), what
    assert len(list(cache.iterdir())) == 3


def test_a_damaged_entry_is_trained_again_and_replaced(tmp_path, cache, steps, capsys):
    r = resolve_recipe(None, MICRO_NET)
    data = toy_dataset(32, seed=2, size=4)
    first, _, _ = _stage(tmp_path / "a", r, data)
    [entry] = cache.iterdir()
    weights = next(entry.glob("checkpoints/step-*/unet_ema/*.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-4:] = bytes(b ^ 0xFF for b in blob[-4:])  # the file still parses; its checksum no longer matches
    weights.write_bytes(bytes(blob))
    capsys.readouterr()
    again, _, run = _stage(tmp_path / "b", r, data)
    assert len(steps) == 6 and not _cached(run) and _same(first, again)  # not trusted: trained again
    assert "damaged or stale pretraining cache entry" in capsys.readouterr().err
    _, _, run = _stage(tmp_path / "c", r, data)
    assert len(steps) == 6 and _cached(run)  # replaced by an intact entry
    for damage in (
        lambda e: (e / "entry.json").write_text("{not json"),
        lambda e: (e / "entry.json").write_text(
            json.dumps({**json.loads((e / "entry.json").read_text()), "checkpoint": "step-000002"})
        ),
        lambda e: next(e.glob("checkpoints/step-*/state.json")).write_text("{}"),
        lambda e: next(e.glob("checkpoints/step-*/optimizer.pt")).unlink(),
    ):
        damage(entry)
        n = len(steps)
        _, _, run = _stage(tmp_path / f"d{n}", r, data)
        assert len(steps) == n + 3 and not _cached(run)


def test_what_is_never_cached_and_what_is_never_replaced(tmp_path, cache, steps):
    r = resolve_recipe(None, MICRO_NET)
    data = toy_dataset(32, seed=3, size=4)
    # data derived from a release (no ledger), and a conditioner whose settings the key cannot see
    _stage(tmp_path / "released", r, data, ledger=False)
    _stage(tmp_path / "conditioned", r, data, condition=training.label_conditioner(data, r, torch.device("cpu")))
    assert len(steps) == 6 and not cache.exists()
    # a run that holds its own (interrupted) stage continues it; the cache does not replace it
    _stage(tmp_path / "a", r, data)  # trains, kept in the cache
    _, _, own = _stage(tmp_path / "own", r, data, train=dataclasses.replace(STAGE, max_steps=1))
    n = len(steps)
    result, _, own = _stage(tmp_path / "own", r, data, train=dataclasses.replace(STAGE, max_steps=3))
    assert len(steps) == n + 2 and result.steps == 3  # steps 2 and 3 of its own stage, not the cached copy


def test_one_cache_rule_for_every_floor(tmp_path, monkeypatch):
    from privdiff.data import glyphs
    from privdiff.evaluation.features import cache_dir as features_cache

    monkeypatch.setenv("PRIVDIFF_CACHE", str(tmp_path / "c"))
    assert cache_dir() == features_cache() == glyphs._cache_root() == tmp_path / "c"
    assert stage_key(resolve_recipe(None, MICRO_NET), toy_dataset(8, seed=0, size=4), train=STAGE).path.parent == (
        tmp_path / "c" / "pretrain"
    )
    monkeypatch.delenv("PRIVDIFF_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "privdiff")


def test_dpdm_warm_start_and_lora_pretraining_are_one_stage():
    """DPDM's warm start defaults are LoRA's pretraining: on the same public data, model and diffusion settings the
    two have one key (one cached stage)."""
    from privdiff.core.stages import public_data

    shared = ["model.channels=[8,16]", "model.norm_num_groups=4", "model.attention_levels=[]"]
    lora = resolve_recipe("recipes/lora-mnist5k.yaml", shared)
    same_diffusion = [f"diffusion.{k}={v!r}".replace("'", "") for k, v in dataclasses.asdict(lora.diffusion).items()]
    dpdm = resolve_recipe("recipes/dpdm-mnist5k.yaml", [*shared, *same_diffusion, "dpdm.public_data=digits"])
    like = toy_dataset(8, seed=0, size=16)
    a = stage_key(lora, public_data(lora, like=like, section="lora"), train=lora.lora.pretrain)
    b = stage_key(dpdm, public_data(dpdm, like=like, section="dpdm"), train=dpdm.dpdm.pretrain)
    assert a.key == b.key
