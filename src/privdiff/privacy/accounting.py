"""Privacy accounting: ε of a list of mechanisms, and noise calibrated to a target (ε, δ).

The mechanisms are Opacus' accountants (RDP by default, PRV selectable) over a history of
``(noise_multiplier, sample_rate, steps)`` triples: a Poisson-subsampled Gaussian mechanism run
``steps`` times. Everything privdiff releases is expressed that way (DP-SGD steps; DPP's noisy
class means), so heterogeneous stages compose in one accountant.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterable

import numpy as np
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

ACCOUNTANTS = ("rdp", "prv")
# Opacus' default RDP orders stop at 63; small-σ / large-ε runs need higher ones to be tight.
RDP_ORDERS = (
    [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 96, 128, 160, 192, 256, 384, 512, 768, 1024]
)

History = list[tuple[float, float, int]]


@functools.lru_cache(maxsize=256)
def _rdp_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP curve (over ``RDP_ORDERS``) of one Poisson-subsampled Gaussian step; T steps compose to T times it."""
    return np.asarray(
        rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS)
    )


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and not math.isnan(x)


def _is_integer(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_delta(delta) -> None:
    if not _is_number(delta) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _mechanism(m) -> tuple[float, float, int]:
    """One ``(noise_multiplier, sample_rate, steps)``, checked: σ >= 0 finite, q in [0, 1], steps an integer >= 0."""
    s, q, t = m
    if not (
        _is_number(s)
        and math.isfinite(s)
        and s >= 0
        and _is_number(q)
        and 0 <= q <= 1
        and (_is_integer(t) or (_is_number(t) and float(t).is_integer()))
        and t >= 0
    ):
        raise ValueError(
            f"not a mechanism (noise_multiplier >= 0 finite, sample_rate in [0, 1], steps an integer >= 0): "
            f"{(s, q, t)!r}"
        )
    return float(s), float(q), int(t)


def epsilon(history: Iterable[tuple[float, float, int]], *, delta: float, accountant: str = "rdp") -> float:
    """ε(δ) of the composition of Poisson-subsampled Gaussian mechanisms.

    Args:
        history: ``(noise_multiplier, sample_rate, steps)`` per mechanism, in any order.
        delta: target δ.
        accountant: ``"rdp"`` (Rényi DP, Mironov et al. 2019) or ``"prv"`` (privacy random
            variables, Gopi et al. 2021; Opacus reports its upper bound).

    A mechanism with ``noise_multiplier == 0`` (no noise) makes ε infinite.
    """
    _check_delta(delta)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    hist = [(s, q, t) for s, q, t in map(_mechanism, history) if t > 0 and q > 0]
    if not hist:
        return 0.0
    if any(s <= 0 for s, _, _ in hist):
        return math.inf
    if accountant == "rdp":
        # Opacus' RDP analysis (Mironov et al. 2019); composition adds RDP curves.
        rdp = sum(t * _rdp_one_step(s, q) for s, q, t in hist)
        eps, _order = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
        return float(eps)
    if accountant == "prv":
        acc = PRVAccountant()
        acc.history = hist
        return float(acc.get_epsilon(delta=delta, eps_error=0.01))
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def calibrate_noise(
    *,
    epsilon_target: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    prior: Iterable[tuple[float, float, int]] = (),
    rel_tol: float = 1e-3,
) -> float:
    """Smallest noise multiplier σ such that ``prior`` + (σ, q, steps) spends at most ``epsilon_target``.

    Bisection on σ; the returned σ is on the safe side (its ε ≤ target) and within ``rel_tol``
    (relative) of the target in ε. ``prior`` are mechanisms already run on the same data (e.g.
    DPP's release), so the whole composition, not only this stage, meets the target.

    Raises:
        ValueError: if an argument is out of range (ε finite and > 0, δ in (0, 1), q in (0, 1], steps an
            integer >= 1), the prior alone already exceeds the target, or no σ ≤ 1e4 reaches it.
    """
    if not _is_number(epsilon_target) or not math.isfinite(epsilon_target) or epsilon_target <= 0:
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon_target!r}")
    _check_delta(delta)
    if not _is_number(sample_rate) or not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate!r} (is the batch larger than the data set?)")
    if not _is_integer(steps) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not _is_number(rel_tol) or not 0 < rel_tol < 1:
        raise ValueError(f"rel_tol must be in (0, 1), got {rel_tol!r}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    prior = list(prior)
    if epsilon(prior, delta=delta, accountant=accountant) >= epsilon_target:
        raise ValueError(f"the budget epsilon={epsilon_target} is already spent by earlier releases")

    def eps_at(sigma: float) -> float:
        return epsilon(prior + [(sigma, sample_rate, steps)], delta=delta, accountant=accountant)

    lo, hi = 0.0, 1.0
    while eps_at(hi) > epsilon_target:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"cannot reach epsilon={epsilon_target} with sample rate {sample_rate} and {steps} steps")
    # invariant: eps_at(hi) <= target < eps_at(lo)  (eps_at(0) = inf)
    while True:
        mid = (lo + hi) / 2
        if eps_at(mid) > epsilon_target:
            lo = mid
        else:
            hi = mid
        if epsilon_target - eps_at(hi) <= rel_tol * epsilon_target or hi - lo < 1e-6:
            return hi
