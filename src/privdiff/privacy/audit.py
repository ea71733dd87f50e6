"""Empirical privacy audit in one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

A claimed ε is checked by an experiment whose outcome an ε-DP mechanism cannot produce often:

1. m canaries; canary i is in the training data iff a fair coin S_i says so (independently).
2. Train once. Canaries are examples like any other: Poisson-sampled at the run's rate q,
   clipped to C by the run's own clipping, noised by the run's own optimizer.
3. Score each canary with the strongest attack available: white-box *gradient (Dirac) canaries*.
   Canary i's loss is M·E[i], with E a one-column embedding no real example touches (its rows
   are the canaries' own coordinates) and M ≫ C, so a sampled included canary adds exactly its
   clipped gradient C·e_i to the step's sum, and nothing else writes there. The attacker sees
   every noisy gradient g̃_t (the white-box threat model DP-SGD's accounting covers) and scores
   Y_i = Σ_t g̃_t[i]·B/C = (#steps that sampled i, if included) + Σ_t σ·Z_t,i.
4. Guess: the k₊ highest scores are IN, the k₋ lowest are OUT (k₊, k₋ fixed in advance);
   W = number of correct guesses among r = k₊ + k₋.
5. Bound (Theorem 3.1): if the mechanism is ε-DP, W is stochastically dominated by
   Binomial(r, e^ε / (1 + e^ε)). The audited lower bound at confidence 1 − β is the ε at which
   P[Binomial(r, e^ε/(1+e^ε)) ≥ W] = β − m·δ: any smaller ε makes the observed W too unlikely.
   (δ enters as a union bound over the m canaries' δ-events: more conservative than the
   paper's Theorem 5.2, never less.)

A bug that silently removes the noise or the clipping makes the scores separate perfectly and
the bound exceeds the claim; a correct run keeps it below (with probability ≥ 1 − β).

**Which ε is audited.** The canaries live in one DP-SGD stage. In a method with other private
events (DPP's release before DP-SGD) the experiment only sees that stage, so the bound is compared
with the stage's own ε — the accountant on the stage's events alone — not with the run's composed
total, which is larger and would let a broken DP-SGD stage hide behind the release's share of the
budget. Both are reported (:class:`AuditResult`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.stats import binom
from torch import nn

ATTACK = "white-box gradient canaries (Dirac; score = sum over steps of the noisy gradient on the canary's coordinate)"


def epsilon_lower_bound(*, correct: int, guesses: int, canaries: int, delta: float = 0.0, beta: float = 0.05) -> float:
    """ε that ``correct`` right guesses out of ``guesses`` rule out at confidence 1 − β (Steinke et al. 2023, Thm 3.1).

    The largest ε with P[Binomial(r, e^ε/(1+e^ε)) ≥ W] ≤ β − m·δ, or 0 when even ε = 0 explains W.
    """
    W, r = int(correct), int(guesses)
    budget = beta - canaries * delta  # the tail left once every canary's δ-event is paid for
    if budget <= 0:
        raise ValueError(f"m*delta = {canaries * delta:g} >= beta = {beta}: use fewer canaries or a smaller delta")

    def tail(eps: float) -> float:  # P[Binomial(r, p_ε) ≥ W]
        p = 1.0 / (1.0 + math.exp(-eps))
        return float(binom.sf(W - 1, r, p))

    if W == 0 or tail(0.0) > budget:
        return 0.0
    lo, hi = 0.0, 1.0
    while tail(hi) <= budget:  # tail grows with ε; find an ε that explains W
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return math.inf
    while hi - lo > 1e-6:  # invariant: tail(lo) ≤ budget < tail(hi)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) <= budget else (lo, mid)
    return lo


@dataclass
class AuditResult:
    """One audit's outcome. ``claimed_epsilon``: the run's ε (the ledger's composition of every stage);
    ``stage_epsilon``: the ε of the audited ``stage``'s events alone, what the bound is checked against."""

    claimed_epsilon: float
    stage: str
    stage_epsilon: float
    delta: float
    epsilon_lower_bound: float
    confidence: float
    canaries: int
    included: int
    guesses_in: int
    guesses_out: int
    correct: int
    steps: int
    attack: str = ATTACK

    @property
    def passed(self) -> bool:
        """The experiment is consistent with the claim: the audited lower bound does not exceed the audited stage's ε."""
        return self.epsilon_lower_bound <= self.stage_epsilon

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


class GradientCanaries:
    """m Dirac gradient canaries for one DP-SGD run (see module docstring), each included by a fair coin.

    The training loop calls :meth:`install` (before its optimizer is built) and :meth:`wrap` on its DP
    engine; the wrapped engine attaches the observer, extends each batch and wraps the loss.

    Args:
        m: number of canaries.
        num_examples: N, the real examples; canary i is example N + i.
        seed: draws the coins and the canaries' Poisson sampling.
        magnitude: M, the norm of a canary's raw gradient (≫ C, so the run's clipping must act).
    """

    def __init__(self, *, m: int, num_examples: int, seed: int, magnitude: float = 1e3):
        if m < 2:
            raise ValueError(f"an audit needs at least 2 canaries, got {m}")
        g = torch.Generator().manual_seed(seed * 1000 + 31)
        self.m, self.N, self.magnitude = m, num_examples, magnitude
        self.included = torch.rand(m, generator=g) < 0.5  # S_i: fair coins
        self.sampler = torch.Generator().manual_seed(seed * 1000 + 32)
        self.scores = torch.zeros(m, dtype=torch.float64)
        self.steps = 0
        self.layer = nn.Embedding(m + 1, 1, padding_idx=m)  # row i: canary i's coordinate; row m: everyone else
        nn.init.zeros_(self.layer.weight)

    def install(self, module: nn.Module) -> None:
        """Add the canaries' coordinates to the trained module (so the run's clipping and noise reach them)."""
        module.add_module("audit_canaries", self.layer.to(next(module.parameters()).device))

    def attach(self, engine) -> None:
        """Observe every noisy gradient the engine's optimizer produces (after noise, before the update)."""
        if not getattr(engine, "private", False) or getattr(engine, "bk", None) is None:
            raise ValueError("the audit needs a private run with grad_sample_mode=bk (privacy.enabled=true)")
        self.q, opt = engine.sample_rate, engine.optimizer
        previous = opt.step_hook

        def hook(o) -> None:
            if previous is not None:
                previous(o)
            g = self.layer.weight.grad[: self.m, 0].detach().double().cpu()  # (Σ clipped + σC·Z) / B
            self.scores += g * o.expected_batch_size / o.max_grad_norm
            self.steps += 1

        opt.step_hook = hook

    def extend(self, indices: torch.Tensor) -> torch.Tensor:
        """The batch plus the included canaries Poisson-sampled at the run's rate q (example N + i)."""
        drawn = (torch.rand(self.m, generator=self.sampler) < self.q) & self.included
        return torch.cat([indices, self.N + drawn.nonzero().flatten()])

    def wrap_loss(self, loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor], *, K: int) -> Callable:
        """Per-example loss: the run's for real examples, M·E[i] for canary i (its K rows all point at row i).

        Canary examples pass through the network as example 0 with their loss masked out, so every
        layer sees the B·K rows per-example clipping expects, and only the canary row gets their gradient.
        """
        N, m, M = self.N, self.m, self.magnitude

        def loss(module: nn.Module, idx: torch.Tensor) -> torch.Tensor:
            is_canary = idx >= N
            real = loss_fn(module, torch.where(is_canary, torch.zeros_like(idx), idx))  # [B]
            rows = torch.where(is_canary, idx - N, torch.full_like(idx, m)).repeat_interleave(K)
            canary = self.layer(rows.to(self.layer.weight.device)).view(-1, K).mean(1) * M  # [B]
            return torch.where(is_canary.to(real.device), canary, real)

        return loss

    def wrap(self, engine, *, noise_multiplicity: int) -> "CanaryEngine":
        """The run's engine with the canaries in (after :meth:`install`): its batches gain the included
        canaries Poisson-sampled at q, its loss their terms, and every noisy gradient is observed."""
        return CanaryEngine(engine, self, noise_multiplicity=noise_multiplicity)

    def result(
        self,
        *,
        claimed_epsilon: float,
        stage: str,
        stage_epsilon: float,
        delta: float,
        k_in: int | None = None,
        k_out: int | None = None,
        beta: float = 0.05,
        seed: int = 0,
    ) -> AuditResult:
        """Guess top-k₊ IN and bottom-k₋ OUT (defaults m/5 each, fixed before looking), count, bound.

        ``claimed_epsilon`` is the run's composed ε, ``stage_epsilon`` that of the canaries' ``stage`` alone."""
        k_in = self.m // 5 if k_in is None else k_in
        k_out = self.m // 5 if k_out is None else k_out
        if k_in + k_out > self.m:
            raise ValueError(f"k_in + k_out = {k_in + k_out} guesses for {self.m} canaries")
        order = np.random.default_rng(seed).permutation(self.m)  # ties broken at random, not by index
        ranked = order[np.argsort(-self.scores.numpy()[order], kind="stable")]
        S = self.included.numpy()
        correct = int(S[ranked[:k_in]].sum() + (~S[ranked[self.m - k_out :]]).sum())
        bound = epsilon_lower_bound(correct=correct, guesses=k_in + k_out, canaries=self.m, delta=delta, beta=beta)
        return AuditResult(
            claimed_epsilon=claimed_epsilon,
            stage=stage,
            stage_epsilon=stage_epsilon,
            delta=delta,
            epsilon_lower_bound=bound,
            confidence=1 - beta,
            canaries=self.m,
            included=int(S.sum()),
            guesses_in=k_in,
            guesses_out=k_out,
            correct=correct,
            steps=self.steps,
        )


class _CanaryBatches:
    """The engine's Poisson batches, each followed by the included canaries sampled at the same q."""

    def __init__(self, batches, canaries: GradientCanaries):
        self._batches, self._canaries = batches, canaries

    def next(self) -> torch.Tensor:
        return self._canaries.extend(self._batches.next())

    def __getattr__(self, name: str):
        return getattr(self._batches, name)


class CanaryEngine:
    """A DP engine (:class:`~privdiff.privacy.dpsgd.DPSGD`) with an audit's canaries in it, used exactly as the
    engine is: ``batches.next()`` adds the included canaries, ``step(indices, loss_fn)`` gives them their
    loss (:meth:`GradientCanaries.wrap_loss`); everything else is the engine's own."""

    def __init__(self, engine, canaries: GradientCanaries, *, noise_multiplicity: int):
        canaries.attach(engine)
        self._engine, self._canaries, self._K = engine, canaries, noise_multiplicity
        self.batches = _CanaryBatches(engine.batches, canaries)

    def step(self, indices: torch.Tensor, loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> float:
        return self._engine.step(indices, self._canaries.wrap_loss(loss_fn, K=self._K))

    def __getattr__(self, name: str):
        return getattr(self._engine, name)
