"""DP-SGD on Opacus' parts, with DPDM's noise multiplicity.

One private step (Abadi et al. 2016, with Poisson sampling as the accountant assumes):

1. B ~ Poisson: each of the N examples is in the batch with probability q (Opacus'
   ``UniformWithReplacementSampler``).
2. Per-example loss ℓ_b, averaged over K noise draws *inside* the example (DPDM §3.2), split into
   physical chunks of at most ``max_physical_batch_size`` rows (examples × K).
3. Per-example gradient g_b = Σ_k ∇(ℓ_bk / K): the rows' per-sample gradients folded over K.
4. Clip: ĝ_b = g_b · min(1, C / ‖g_b‖)  (flat clipping over all parameters).
5. Noise: g̃ = (Σ_b ĝ_b + N(0, σ²C² I)) / (qN)  (Opacus ``DPOptimizer``; denominator = expected batch size).
6. Optimizer step on g̃.

Each example still contributes exactly one clipped gradient, so K costs no privacy.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from .bookkeeping import BookKeeping
from .grad_sample import make_grad_sample_module

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
"""``loss_fn(module, indices) -> per-example loss [len(indices)]`` (rows ordered sample-major)."""


class PoissonBatches:
    """Poisson-sampled batches of example indices: each index independently with probability q."""

    def __init__(self, *, num_examples: int, sample_rate: float, generator: torch.Generator):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {sample_rate} (batch size larger than the data set?)")
        self.sampler = UniformWithReplacementSampler(
            num_samples=num_examples, sample_rate=sample_rate, generator=generator, steps=1
        )

    @property
    def sample_rate(self) -> float:
        return self.sampler.sample_rate

    def next(self) -> torch.Tensor:
        return torch.as_tensor(next(iter(self.sampler)), dtype=torch.long)


def fold_noise_multiplicity(module: nn.Module, K: int) -> None:
    """Fold per-row gradients (B·K, ...) to per-example gradients (B, ...) by summing each example's K rows.

    Rows are ordered sample-major (row b·K + k is example b, draw k) and each row's loss already
    carries the 1/K weight, so the sum is the gradient of the example's K-averaged loss.
    """
    if K == 1:
        return
    for p in module.parameters():
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            continue
        if gs.shape[0] % K:
            raise RuntimeError(f"grad_sample has {gs.shape[0]} rows, not a multiple of K={K}")
        p.grad_sample = gs.view(gs.shape[0] // K, K, *gs.shape[1:]).sum(dim=1)


def _chunks(indices: torch.Tensor, rows_per_chunk: int) -> list[torch.Tensor]:
    return list(indices.split(rows_per_chunk)) if len(indices) else [indices]


class DPSGD:
    """Private training step: Poisson batches, per-example clipping to C, Gaussian noise σC.

    Args:
        model: the module to train (validated by Opacus).
        optimizer: a torch optimizer over ``model``'s trainable parameters.
        num_examples: N, the size of the private data set.
        batch_size: expected logical batch size; q = batch_size / N.
        noise_multiplier: σ (noise std = σ·C).
        max_grad_norm: C.
        noise_multiplicity: K noise draws per example, averaged before clipping.
        max_physical_batch_size: rows (examples × K) per forward/backward.
        generator: drives the Poisson sampler.
        noise_generator: drives the Gaussian noise of the mechanism.
        grad_sample_mode: ``"bk"`` (privdiff's one-backward book-keeping clipping, the default),
            or Opacus' per-sample gradients, ``"hooks"`` or ``"functorch"``. All give the same update.
    """

    private = True

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        num_examples: int,
        batch_size: int,
        noise_multiplier: float,
        max_grad_norm: float,
        noise_multiplicity: int = 1,
        max_physical_batch_size: int = 512,
        generator: torch.Generator,
        noise_generator: torch.Generator,
        grad_sample_mode: str = "bk",
    ):
        if grad_sample_mode == "bk":
            # clipping happens in the backward (BookKeeping); the optimizer adds noise σC to the
            # clipped sum and divides by the expected batch size, exactly as DPOptimizer does
            self.module, self.bk = model, BookKeeping(model, noise_multiplicity=noise_multiplicity, max_grad_norm=max_grad_norm)
            optimizer_cls = _ClippedSumOptimizer
        else:
            self.module, self.bk = make_grad_sample_module(model, grad_sample_mode=grad_sample_mode), None
            optimizer_cls = DPOptimizer
        self.optimizer = optimizer_cls(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=batch_size,
            loss_reduction="mean",
            generator=noise_generator,
        )
        self.batches = PoissonBatches(num_examples=num_examples, sample_rate=batch_size / num_examples, generator=generator)
        self.K = noise_multiplicity
        self.examples_per_chunk = max(1, max_physical_batch_size // noise_multiplicity)
        self.noised_steps = 0  # counted by the optimizer itself, on steps where noise was added
        self.optimizer.attach_step_hook(self._count_step)

    def _count_step(self, _optimizer: DPOptimizer) -> None:
        self.noised_steps += 1

    @property
    def noise_multiplier(self) -> float:
        return self.optimizer.noise_multiplier

    @property
    def max_grad_norm(self) -> float:
        return self.optimizer.max_grad_norm

    @property
    def sample_rate(self) -> float:
        return self.batches.sample_rate

    def _begin_step(self) -> None:
        """A clean slate: nothing left over from an earlier (possibly failed) step can reach this update."""
        opt = self.optimizer
        opt._step_skip_queue.clear()
        opt._is_last_step_skipped = False
        for group in opt.original_optimizer.param_groups:
            for p in group["params"]:
                p.grad, p.grad_sample, p.summed_grad = None, None, None
        if self.bk is not None and {id(p) for p in opt.params} != {id(p) for p in self.bk.params}:
            raise RuntimeError("the optimizer's trainable parameters are not the ones the engine clips "
                               "(was a parameter frozen or unfrozen after the engine was built?)")

    def step(self, indices: torch.Tensor, loss_fn: LossFn) -> float:
        """One logical DP-SGD step on the examples ``indices``; returns their mean loss (a diagnostic)."""
        self._begin_step()
        total, count = 0.0, 0
        chunks = _chunks(indices, self.examples_per_chunk)
        for i, chunk in enumerate(chunks):
            if len(chunk) and self.bk is not None:
                with self.bk.recording():
                    loss = loss_fn(self.module, chunk)
                self.bk.clipped_backward(loss)  # p.grad = Σ_b min(1, C/‖g_b‖) g_b
                total, count = total + float(loss.detach().sum()), count + len(chunk)
            elif len(chunk):
                loss = loss_fn(self.module, chunk)
                with warnings.catch_warnings():  # Opacus' hooks warn when the input needs no grad: expected here
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.sum().backward()
                fold_noise_multiplicity(self.module, self.K)
                total, count = total + float(loss.detach().sum()), count + len(chunk)
            else:  # empty Poisson batch: no example contributes, the noise is still added
                for p in self.optimizer.params:
                    if self.bk is not None:
                        p.grad = torch.zeros_like(p)
                    else:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            if i < len(chunks) - 1:
                self.optimizer.signal_skip_step(do_skip=True)  # accumulate clipped grads, no noise yet
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return total / max(count, 1)


class _ClippedSumOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' optimizer for clipped sums computed before it runs (``p.grad`` = Σ_b c_b g_b), noised as Opacus does.

    Only the accumulation differs: Opacus deep-copies each ``p.grad`` into ``p.summed_grad``
    (~40 µs of Python per parameter, every step); book-keeping hands over a fresh tensor per
    chunk that nothing else holds, so the first chunk's is kept as is and later ones are added.
    """

    def accumulate(self) -> None:
        for p in self.params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad)
            else:
                p.summed_grad = p.grad.detach()


class NonPrivateSGD:
    """The same step without clipping or noise (``privacy.enabled=false``): a baseline.

    Batches are Poisson too, and the gradient is divided by the expected batch size, so the only
    difference from :class:`DPSGD` is the privacy mechanism itself.
    """

    private = False
    noise_multiplier = 0.0
    max_grad_norm = None

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        num_examples: int,
        batch_size: int,
        max_physical_batch_size: int = 512,
        noise_multiplicity: int = 1,
        generator: torch.Generator,
    ):
        self.module = model
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.batches = PoissonBatches(num_examples=num_examples, sample_rate=batch_size / num_examples, generator=generator)
        self.examples_per_chunk = max(1, max_physical_batch_size // noise_multiplicity)
        self.noised_steps = 0

    @property
    def sample_rate(self) -> float:
        return self.batches.sample_rate

    def step(self, indices: torch.Tensor, loss_fn: LossFn) -> float:
        total = 0.0
        for chunk in _chunks(indices, self.examples_per_chunk):
            if len(chunk):
                loss = loss_fn(self.module, chunk)
                (loss.sum() / self.batch_size).backward()
                total += float(loss.detach().sum())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / max(len(indices), 1)
