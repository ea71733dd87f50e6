"""train.precision=bf16 through the one training loop: the same mechanism, so the same ledger and ε."""

import json
from dataclasses import replace

import pytest
import torch

from privdiff.config import resolve_recipe
from privdiff.core.training import train_denoiser
from privdiff.privacy.budget import data_identity
from privdiff.privacy.ledger import Ledger
from privdiff.runs import Run
from tests.helpers import toy_dataset

TINY = [
    "model.channels=[8,16]",
    "model.attention_levels=[1]",
    "model.attention_head_dim=8",
    "model.norm_num_groups=4",
    "data.resolution=8",
    "train.batch_size=8",
    "train.epochs=2",
    "train.max_physical_batch_size=8",  # several chunks per step: virtual batches under autocast too
    "privacy.noise_multiplicity=2",
    "train.checkpoint_every=1000",
]


def _run(out, recipe, data, *, private: bool):
    run = Run(out)
    run.path.mkdir(parents=True, exist_ok=True)
    ledger = (
        Ledger(
            delta=recipe.privacy.delta,
            accountant=recipe.privacy.accountant,
            dataset=data_identity(data),
            target_epsilon=recipe.privacy.epsilon,
        )
        if private
        else None
    )
    result = train_denoiser(run=run, recipe=recipe, dataset=data, ledger=ledger, progress=False)
    return result, run


@pytest.mark.usefixtures("deterministic_kernels")
def test_a_bf16_run_writes_the_ledger_of_the_fp32_run(tmp_path):
    data = toy_dataset(32, seed=int(torch.randint(0, 10**6, ())))
    base = resolve_recipe(None, [*TINY, "train.max_steps=4"])
    runs = {}
    for precision in ("fp32", "bf16"):
        r = replace(base, train=replace(base.train, precision=precision))
        result, run = _run(tmp_path / precision, r, data, private=True)
        assert result.steps == 4
        runs[precision] = (result, run, json.loads(run.ledger_path.read_text()))
    (r32, _, l32), (r16, run16, l16) = runs["fp32"], runs["bf16"]
    assert l16.pop("run_id") != l32.pop("run_id")  # each ledger names its own run; everything else is equal:
    assert l16 == l32  # the events (noise multiplier, sample rate, steps), epsilon, delta, accountant, dataset
    assert l16["events"] and l16["epsilon"] > 0
    # both trained (finite, and different weights: bf16 rounding changed the updates, not the mechanism)
    w32, w16 = (torch.cat([p.flatten() for p in r.denoiser.parameters()]) for r in (r32, r16))
    assert bool(torch.isfinite(w16).all()) and not torch.equal(w16, w32)
    assert all(p.dtype == torch.float32 for p in r16.denoiser.parameters())
    assert [e["step"] for e in run16.read_train_log()] == [1, 2, 3, 4]


def test_a_nonprivate_bf16_stage_trains(tmp_path):
    data = toy_dataset(16, seed=5)
    r = resolve_recipe(None, [*TINY, "train.max_steps=2", "train.precision=bf16", "privacy.enabled=false"])
    result, run = _run(tmp_path, r, data, private=False)
    assert result.steps == 2
    losses = [e["loss"] for e in run.read_train_log()]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
