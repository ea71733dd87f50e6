"""The one training loop: its schedule, and the loop itself (resume, budget stop, empty batches, extra terms)."""

import math
from dataclasses import replace

import pytest
import torch

from privdiff.config import resolve_recipe
from privdiff.core.training import STATE_KEY, Stage, learning_rate, train_denoiser
from privdiff.data import ImageDataset
from privdiff.privacy.budget import data_identity, planned_steps
from privdiff.privacy.dpsgd import PoissonBatches
from privdiff.privacy.ledger import Ledger
from privdiff.runs import Run
from tests.helpers import toy_dataset


def test_planned_steps_are_epochs_over_sample_rate():
    r = resolve_recipe(None, ["train.batch_size=250", "train.epochs=55"])
    assert planned_steps(r.train, 4000) == 880


def test_cosine_schedule_depends_only_on_the_step():
    r = resolve_recipe(None, ["train.lr=0.003", "train.lr_schedule=cosine"])
    total = 880
    lrs = [learning_rate(r.train, s, total) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(0.003)
    assert lrs[total // 2] == pytest.approx(0.003 * (0.05 + 0.95 * 0.5))
    assert lrs[-1] == pytest.approx(0.003 * 0.05)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay
    assert learning_rate(r.train, 10 * total, total) == pytest.approx(0.003 * 0.05)  # past the plan: floor


def test_constant_schedule():
    r = resolve_recipe(None, ["train.lr=0.01"])
    assert {learning_rate(r.train, s, 100) for s in (0, 50, 100)} == {0.01}
    assert not math.isnan(learning_rate(r.train, 0, 1))


# -- the loop itself, on a tiny pixel UNet and fresh random data ---------------------------------

TINY_LOOP = [
    "model.channels=[8,16]",
    "model.attention_levels=[]",
    "model.norm_num_groups=4",
    "data.resolution=8",
    "train.batch_size=8",
    "train.max_physical_batch_size=64",
    "privacy.noise_multiplicity=2",
    "train.checkpoint_every=1000",
]


def _ledger(recipe, dataset: ImageDataset, path=None) -> Ledger:
    """The run's ledger (continued from ``path`` if it exists), with no registry: the loop's own behaviour."""
    if path is not None and path.exists():
        return Ledger.load(path)
    return Ledger(
        delta=recipe.privacy.delta,
        accountant=recipe.privacy.accountant,
        dataset=data_identity(dataset),
        target_epsilon=recipe.privacy.epsilon,
    )


def _train(out, recipe, dataset, *, max_steps: int, private: bool = True, term=None, stage: Stage = Stage()):
    r = replace(recipe, train=replace(recipe.train, max_steps=max_steps))
    run = Run(out)
    run.path.mkdir(parents=True, exist_ok=True)
    ledger = _ledger(r, dataset, run.ledger_path) if private else None
    result = train_denoiser(run=run, recipe=r, dataset=dataset, ledger=ledger, stage=stage, term=term, progress=False)
    return result, ledger, run


@pytest.mark.usefixtures("deterministic_kernels")
def test_a_resumed_stage_takes_the_steps_of_an_uninterrupted_one(tmp_path):
    r = resolve_recipe(None, [*TINY_LOOP, "train.epochs=2", "train.seed=3"])
    data = toy_dataset(32, seed=int(torch.randint(0, 10**6, ())))
    whole, ledger_whole, _ = _train(tmp_path / "whole", r, data, max_steps=5)
    _train(tmp_path / "split", r, data, max_steps=2)  # stops at step 2, checkpointed
    resumed, ledger_resumed, run = _train(tmp_path / "split", r, data, max_steps=5)  # a new process: ledger from disk
    assert whole.steps == resumed.steps == 5
    for a, b in zip(whole.denoiser.state_dict().values(), resumed.denoiser.state_dict().values()):
        assert torch.equal(a, b)
    assert ledger_resumed.steps("dp_sgd") == ledger_whole.steps("dp_sgd") == 5
    assert ledger_resumed.epsilon() == ledger_whole.epsilon()
    assert [e["step"] for e in run.read_train_log()] == [1, 2, 3, 4, 5]


def test_the_stage_stops_before_the_step_that_would_pass_the_budget(tmp_path, monkeypatch):
    """The guard is the loop's last line: with σ too small for the plan (as a calibration bug would give), the
    stage stops at the last step that keeps the ledger's ε within the target, and says so."""
    import privdiff.core.training as training

    r = resolve_recipe(None, [*TINY_LOOP, "train.epochs=2", "privacy.epsilon=2"])
    data = toy_dataset(32, seed=int(torch.randint(0, 10**6, ())))
    monkeypatch.setattr(
        training, "noise_for", lambda *a, **k: 1.5
    )  # calibrated for the 8 planned steps: 2.05 (1.5 allows 2)
    result, ledger, run = _train(tmp_path, r, data, max_steps=10**6)
    q = r.train.batch_size / len(data)
    assert result.stopped_at_budget and 0 < result.steps < planned_steps(r.train, len(data))
    assert ledger.steps("dp_sgd") == result.steps
    assert ledger.epsilon() <= 2.0 * (1 + 1e-9) < ledger.epsilon(extra=[(1.5, q, 1)])
    assert len(run.read_train_log()) == result.steps


def _empty_batches(seed: int, *, num_examples: int, sample_rate: float, steps: int) -> list[int]:
    """The steps whose Poisson batch is empty, drawn as the loop's sampler draws them (its generator's seed)."""
    g = torch.Generator().manual_seed(seed * 1000)
    batches = PoissonBatches(num_examples=num_examples, sample_rate=sample_rate, generator=g)
    return [t for t in range(steps) if len(batches.next()) == 0]


def test_an_empty_poisson_batch_is_a_counted_noised_step(tmp_path):
    """q = 1/32: about a third of the batches are empty. Each is still a step of the mechanism: noise only,
    counted in the ledger (Poisson sampling's accounting assumes it), and the weights move."""
    seed = int(torch.randint(0, 1000, ()))
    r = resolve_recipe(None, [*TINY_LOOP, "train.batch_size=1", "train.epochs=1", f"train.seed={seed}"])
    data = toy_dataset(32, seed=seed)
    empty = _empty_batches(seed, num_examples=32, sample_rate=1 / 32, steps=12)
    assert empty, "no empty batch drawn: pick more steps"
    result, ledger, run = _train(tmp_path, r, data, max_steps=12)
    assert result.steps == ledger.steps("dp_sgd") == 12
    assert [e["step"] for e in run.read_train_log()] == list(range(1, 13))
    first = _train(tmp_path / "one", r, data, max_steps=empty[0])[2].load_checkpoint()
    after = _train(tmp_path / "one", r, data, max_steps=empty[0] + 1)[2].load_checkpoint()
    moved = [not torch.equal(a, b) for a, b in zip(first.unet.parameters(), after.unet.parameters())]
    assert all(moved)  # the empty step's update is the Gaussian noise alone, on every parameter


class _Drift:
    """A toy extra term with its own state: a scale w that takes a random walk after each step (own generator)."""

    def __init__(self, seed: int):
        self.w = torch.zeros(())
        self.g = torch.Generator().manual_seed(seed)
        self.calls = 0

    def objective(self, module, idx, loss):
        return loss * (1 + 0.5 * torch.tanh(self.w))

    def after_step(self, step: int) -> None:
        self.w = self.w + torch.randn((), generator=self.g)
        self.calls += 1

    def state_dict(self) -> dict:
        return {"w": self.w.clone(), "g": self.g.get_state(), "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.w, self.calls = state["w"].clone(), int(state["calls"])
        self.g.set_state(state["g"].to(torch.uint8))


@pytest.mark.usefixtures("deterministic_kernels")
def test_an_extra_terms_state_is_checkpointed_and_resumed(tmp_path):
    r = resolve_recipe(None, [*TINY_LOOP, "train.epochs=2"])
    data = toy_dataset(32, seed=int(torch.randint(0, 10**6, ())))
    whole_term, split_term = _Drift(5), _Drift(5)
    whole, _, _ = _train(tmp_path / "whole", r, data, max_steps=5, private=False, term=whole_term)
    _train(tmp_path / "split", r, data, max_steps=2, private=False, term=_Drift(5))
    assert Run(tmp_path / "split").load_checkpoint().extra[STATE_KEY]["calls"] == 2
    resumed, _, _ = _train(
        tmp_path / "split", r, data, max_steps=5, private=False, term=split_term
    )  # a fresh term, as a new process
    assert split_term.calls == whole_term.calls == 5 and torch.equal(split_term.w, whole_term.w)
    for a, b in zip(whole.denoiser.state_dict().values(), resumed.denoiser.state_dict().values()):
        assert torch.equal(a, b)
