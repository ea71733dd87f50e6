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

On W processes (``torchrun``; :mod:`privdiff.distributed`) the step is the same mechanism, so
the accountant's (σ, q, steps) — and ε — do not depend on W:

1. every rank draws the same global Poisson batch B and keeps its shard B_r = B[r::W]
   (:meth:`PoissonBatches.shard`; B is the disjoint union of the B_r);
2.–4. each rank clips its own examples: S_r = Σ_{b∈B_r} ĝ_b;
5. rank 0 alone draws ξ ~ N(0, σ²C² I); one all-reduce gives every rank
   Σ_r S_r + ξ = Σ_{b∈B} ĝ_b + ξ, divided by the global qN (:class:`_WorldSum`);
6. every rank applies the same update, so the replicas stay equal.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers import optimizer_fast_gradient_clipping as opacus_fgc
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..distributed import World, agree, all_reduce_sum_, broadcast_object, current_world
from .clipping import BookKeeping, check_example_axis, layer_outputs
from .grad_sample import make_grad_sample_module

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
"""``loss_fn(module, indices) -> per-example loss [len(indices)]`` (rows ordered sample-major)."""


class PoissonBatches:
    """Poisson-sampled batches of example indices: each index independently with probability q.

    On a world of W processes, :meth:`next` is the *global* batch, identical on every rank, and
    :meth:`shard` is this rank's part of it. Why the union of the ranks' batches is exactly one
    Poisson sample of the data set, whatever W:

    * the generator's state is broadcast from rank 0 when the batches are built, and every rank
      draws exactly once per step, so at step t every rank draws the same mask
      m_1..m_N ~ iid Bernoulli(q) — the mask a single process would draw with the same state;
    * B = {i : m_i = 1} is therefore a Poisson sample with rate q (what the accountant assumes);
    * rank r keeps B_r = B[r::W] (every W-th selected index, by position): the B_r are disjoint
      and their union is B, so every example of B is clipped and summed exactly once in the world.

    Nothing depends on W except which process computes which b ∈ B. (Opacus'
    ``DistributedUniformWithReplacementSampler`` draws a separate mask per rank over a fixed
    shard of the data and *skips* steps whose local batch is empty, so ranks can fall out of
    step; it is not used here.)
    """

    def __init__(
        self, *, num_examples: int, sample_rate: float, generator: torch.Generator, world: World | None = None
    ):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {sample_rate} (batch size larger than the data set?)")
        self.world = world or current_world()
        if self.world.distributed:  # one mask stream for the world: rank 0's
            generator.set_state(broadcast_object(generator.get_state()))
        self.sampler = UniformWithReplacementSampler(
            num_samples=num_examples, sample_rate=sample_rate, generator=generator, steps=1
        )

    @property
    def sample_rate(self) -> float:
        return self.sampler.sample_rate

    def next(self) -> torch.Tensor:
        """The global batch B (every rank gets the same indices)."""
        return torch.as_tensor(next(iter(self.sampler)), dtype=torch.long)

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's part B_r = B[r::W] of a global batch (all of it on a world of one)."""
        return indices[self.world.rank :: self.world.size]


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


PRECISIONS = ("fp32", "bf16")


def forward_precision(precision: str, module: nn.Module) -> contextlib.AbstractContextManager:
    """The context a step's forward runs in: nothing for ``"fp32"``; for ``"bf16"``, bfloat16 autocast
    (``torch.autocast`` on the parameters' device, CPU or CUDA).

    Only the forward is cast: autograd runs each op's backward in the dtype its forward used, so the
    backward of a bfloat16 matrix product is bfloat16 too, and nothing else changes. The parameters,
    their gradients and the optimizer state stay float32; book-keeping clipping upcasts what it
    records (exactly) and forms the per-example norms, the clip factors and the clipped sum in
    float32/float64 (:mod:`privdiff.privacy.clipping`), and the Gaussian noise is drawn like the
    clipped sum it is added to, in float32, at the clip norm C. The mechanism, and so the ledger, is
    the same in either precision.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    return torch.autocast(device.type, dtype=torch.bfloat16)


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
        precision: ``"fp32"`` or ``"bf16"`` (the forward under bfloat16 autocast; book-keeping only,
            see :func:`forward_precision`). The mechanism does not depend on it.
        world: the torch.distributed world (default: the initialised process group, else one
            process). With W > 1 the module is wrapped in ``DistributedDataParallel`` (rank 0's
            parameters are broadcast; its own gradient averaging is switched off with
            ``no_sync``: it would average *unclipped* gradients on every backward, while DP-SGD
            sums *clipped* ones once per logical step, which the optimizer does, see
            :class:`_WorldSum`), each step computes this rank's shard of the global batch, and
            ``max_physical_batch_size`` is per process.
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
        precision: str = "fp32",
        world: World | None = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision != "fp32" and grad_sample_mode != "bk":
            raise ValueError(
                f"precision={precision} needs grad_sample_mode='bk' (Opacus' per-sample gradients would clip in bfloat16)"
            )
        self.precision = precision
        self.world = world = _check_world(world)
        if grad_sample_mode == "bk":
            # clipping happens in the backward (BookKeeping); the optimizer adds noise σC to the
            # clipped sum and divides by the expected batch size, exactly as DPOptimizer does
            self.module, self.bk = (
                model,
                BookKeeping(model, noise_multiplicity=noise_multiplicity, max_grad_norm=max_grad_norm),
            )
            optimizer_cls = _DistributedClippedSumOptimizer if world.distributed else _ClippedSumOptimizer
        else:
            self.module, self.bk = make_grad_sample_module(model, grad_sample_mode=grad_sample_mode), None
            optimizer_cls = _DistributedDPOptimizer if world.distributed else DPOptimizer
        if world.distributed:
            agree(
                (
                    num_examples,
                    batch_size,
                    float(noise_multiplier),
                    float(max_grad_norm),
                    noise_multiplicity,
                    grad_sample_mode,
                ),
                what="the mechanism (N, expected batch size, sigma, C, K, clipping mode)",
            )
            self.module = _replicate(self.module)
        self.optimizer = optimizer_cls(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=batch_size,  # the GLOBAL expected batch qN, whatever W
            loss_reduction="mean",
            generator=noise_generator,
            **({"world": world} if world.distributed else {}),
        )
        self.batches = PoissonBatches(
            num_examples=num_examples, sample_rate=batch_size / num_examples, generator=generator, world=world
        )
        self.K = noise_multiplicity
        self._axis_checked = self.bk is not None  # book-keeping probes the example axis itself
        self.examples_per_chunk = max(1, max_physical_batch_size // noise_multiplicity)
        self.noised_steps = 0  # counted by the optimizer itself, on steps where noise was added
        self.optimizer.attach_step_hook(self._count_step)

    def _check_example_axis(self, loss: torch.Tensor, outputs: dict[str, torch.Tensor]) -> None:
        gsm = self.module.module if isinstance(self.module, DistributedDataParallel) else self.module
        gsm.disable_hooks()  # the probe's backward must not fill grad_sample (its forward's activations stay queued)
        try:
            check_example_axis(loss, outputs, K=self.K)
        finally:
            gsm.enable_hooks()
        self._axis_checked = True

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
            raise RuntimeError(
                "the optimizer's trainable parameters are not the ones the engine clips "
                "(was a parameter frozen or unfrozen after the engine was built?)"
            )

    def step(self, indices: torch.Tensor, loss_fn: LossFn) -> float:
        """One logical DP-SGD step on the examples ``indices`` (the global batch; this rank computes
        its shard); returns their mean loss (a diagnostic, over the whole world)."""
        self._begin_step()
        with _no_sync(self.module):
            total, count = self._clipped_step(self.batches.shard(indices), loss_fn)
        return _world_mean(total, count, self.world, self.optimizer.params)

    def _clipped_step(self, indices: torch.Tensor, loss_fn: LossFn) -> tuple[torch.Tensor | float, int]:
        # the logged loss stays on the device until the step has been queued (no host sync per chunk)
        total, count = 0.0, 0
        chunks = _chunks(indices, self.examples_per_chunk)
        for i, chunk in enumerate(chunks):
            if len(chunk) and self.bk is not None:
                with self.bk.recording(), forward_precision(self.precision, self.module):
                    loss = loss_fn(self.module, chunk)
                self.bk.clipped_backward(loss)  # p.grad = Σ_b min(1, C/‖g_b‖) g_b
                total, count = total + loss.detach().sum().double(), count + len(chunk)
            elif len(chunk):
                probe = not self._axis_checked and len(chunk) >= 2
                with layer_outputs(self.module) if probe else contextlib.nullcontext({}) as outputs:
                    loss = loss_fn(self.module, chunk)
                if probe:  # once: Opacus' samplers, like book-keeping, read the first axis as the example axis
                    self._check_example_axis(loss, outputs)
                with warnings.catch_warnings():  # Opacus' hooks warn when the input needs no grad: expected here
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.sum().backward()
                fold_noise_multiplicity(self.module, self.K)
                total, count = total + loss.detach().sum().double(), count + len(chunk)
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
        return total, count


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

    def add_noise(self) -> None:
        """Opacus' ``add_noise``, the same draws in the same order (one ``_generate_noise`` per parameter,
        secure mode included), with the additions as ONE ``torch._foreach_add`` (same bits; on a GPU,
        one launch instead of one per parameter)."""
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        sums = [p.summed_grad for p in self.params]
        for s in sums:
            _check_processed_flag(s)
        draw = opacus_fgc._generate_noise  # looked up at each step, as the add_noise it replaces does
        noise = [draw(std=std, reference=s, generator=self.generator, secure_mode=self.secure_mode) for s in sums]
        for p, g in zip(self.params, torch._foreach_add(sums, noise) if sums else []):
            p.grad = g.view_as(p)
        for s in sums:
            _mark_as_processed(s)

    def scale_grad(self) -> None:
        """Opacus' ``scale_grad`` (divide by the expected batch size) as one ``torch._foreach_div_`` (same bits)."""
        if self.loss_reduction == "mean" and self.params:
            torch._foreach_div_([p.grad for p in self.params], self.expected_batch_size * self.accumulated_iterations)


class _WorldSum:
    """Opacus' DP optimizers on a torch.distributed world: the clipped sums of all ranks, noised ONCE.

    Each rank holds S_r = Σ_{b∈B_r} ĝ_b (``p.summed_grad``, after its last virtual batch). Then

        rank 0:      p.grad = S_0 + ξ,   ξ ~ N(0, σ²C² I)   (the only call to the noise generator)
        rank r > 0:  p.grad = S_r                           (no noise can be drawn on these ranks)
        all ranks:   p.grad ← Σ_r p.grad = Σ_{b∈B} ĝ_b + ξ   (one all-reduce, same bits everywhere)

    and Opacus' ``scale_grad`` divides by the global expected batch qN. The noise is the single
    draw of rank 0, so the update has the law of the one-process mechanism: std σC/(qN) per
    coordinate whatever W (not √W·σC/(qN), which noise on every rank would give). This is
    Opacus' ``DistributedDPOptimizer`` with the expected batch kept global instead of per-rank
    and one flat all-reduce instead of one per parameter.
    """

    def __init__(self, *args, world: World, **kwargs):
        super().__init__(*args, **kwargs)
        self.world = world

    def add_noise(self) -> None:
        if self.world.rank == 0:
            super().add_noise()  # p.grad = S_0 + ξ
        else:
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                p.grad = p.summed_grad.view_as(p).clone()  # S_r
                _mark_as_processed(p.summed_grad)
        all_reduce_sum_([p.grad for p in self.params])  # Σ_r over the world


class _DistributedClippedSumOptimizer(_WorldSum, _ClippedSumOptimizer):
    """Book-keeping's clipped sums (:class:`_ClippedSumOptimizer`), summed over the world and noised once."""


class _DistributedDPOptimizer(_WorldSum, DPOptimizer):
    """Opacus' per-sample clipping (:class:`~opacus.optimizers.DPOptimizer`), summed over the world and noised once."""


def _check_world(world: World | None) -> World:
    world = world or current_world()
    if world.size != current_world().size:
        raise ValueError(f"world of {world.size} processes given, but the process group has {current_world().size}")
    return world


def _replicate(module: nn.Module) -> DistributedDataParallel:
    """``DistributedDataParallel`` over ``module``: rank 0's parameters and buffers on every rank (its
    construction broadcasts them); its gradient averaging is never used (see :class:`DPSGD`)."""
    device = next(module.parameters()).device
    return DistributedDataParallel(
        module, device_ids=[device] if device.type == "cuda" else None, forward_sync_buffers=False
    )


def _no_sync(module: nn.Module):
    """DDP's ``no_sync()`` (no gradient averaging, no collectives in forward/backward); nothing for a plain module."""
    return module.no_sync() if isinstance(module, DistributedDataParallel) else contextlib.nullcontext()


def _world_mean(total: torch.Tensor | float, count: int, world: World, params) -> float:
    """Σ total / Σ count over the world (the logged loss): the step's one host synchronisation, after it was queued."""
    if world.distributed:
        device = next(iter(params)).device
        t = torch.stack(
            [
                torch.as_tensor(total, dtype=torch.float64, device=device),
                torch.tensor(float(count), dtype=torch.float64, device=device),
            ]
        )
        all_reduce_sum_([t])
        total, count = t[0], int(t[1])
    return float(total) / max(count, 1)


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
        precision: str = "fp32",
        world: World | None = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.world = world = _check_world(world)
        self.module = _replicate(model) if world.distributed else model
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.batches = PoissonBatches(
            num_examples=num_examples, sample_rate=batch_size / num_examples, generator=generator, world=world
        )
        self.examples_per_chunk = max(1, max_physical_batch_size // noise_multiplicity)
        self.noised_steps = 0

    @property
    def sample_rate(self) -> float:
        return self.batches.sample_rate

    def step(self, indices: torch.Tensor, loss_fn: LossFn) -> float:
        """One step on the global batch ``indices`` (this rank computes its shard; gradients summed over the world)."""
        total, local = 0.0, self.batches.shard(indices)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        with _no_sync(self.module):
            for chunk in _chunks(local, self.examples_per_chunk):
                if len(chunk):
                    with forward_precision(self.precision, self.module):
                        loss = loss_fn(self.module, chunk)
                    (loss.sum() / self.batch_size).backward()
                    total = total + loss.detach().sum().double()
        if self.world.distributed:  # Σ over the world (a rank with no examples contributes zeros)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            all_reduce_sum_([p.grad for p in params])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return _world_mean(total, len(local), self.world, params)
