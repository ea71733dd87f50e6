"""Training noise-level distributions p_train(σ).

Each distribution is a callable ``dist(shape, *, generator=None, device=None)`` that
draws float32 noise levels σ of the given shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = [
    "SigmaDistribution",
    "LogNormalSigma",
    "CosineLogSNRSigma",
    "make_sigma_distribution",
    "SIGMA_DISTRIBUTIONS",
]


class SigmaDistribution(Protocol):
    """Protocol of a training noise-level distribution."""

    def __call__(
        self,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor: ...


@dataclass(frozen=True)
class LogNormalSigma:
    """ln σ ~ N(P_mean, P_std²)  (EDM §5, Table 1 "Training").

    Args:
        P_mean: Mean of ln σ.
        P_std: Standard deviation of ln σ.
    """

    P_mean: float = -1.2
    P_std: float = 1.2

    def __call__(
        self,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Draw σ of the given shape (float32)."""
        z = torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
        # σ = exp(P_mean + P_std·z), z ~ N(0, 1)
        return (self.P_mean + self.P_std * z).exp()


def _cosine_time(logsnr: float) -> float:
    """t(λ) = (2/π)·atan(exp(−λ/2)): cosine-schedule time of log-SNR λ."""
    return (2.0 / math.pi) * math.atan(math.exp(-0.5 * logsnr))


@dataclass(frozen=True)
class CosineLogSNRSigma:
    """σ from a uniform time t of the cosine schedule, log-SNR clipped to [min, max].

    t ~ U[t(logsnr_max), t(logsnr_min)] with t(λ) = (2/π)·atan(exp(−λ/2)), and
    σ = tan(π t / 2), so logSNR = −2 ln σ ∈ [logsnr_min, logsnr_max]. This is DPDM's
    distribution for the v-parameterization; it puts more mass at high σ than the
    EDM log-normal (Nichol & Dhariwal 2021 cosine schedule; Dockhorn et al. 2022).

    Args:
        logsnr_min: Lowest log-SNR (largest σ = exp(−logsnr_min/2)).
        logsnr_max: Highest log-SNR (smallest σ = exp(−logsnr_max/2)).
    """

    logsnr_min: float = -9.0
    logsnr_max: float = 13.0

    def __post_init__(self) -> None:
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(f"need logsnr_min < logsnr_max, got {self.logsnr_min}, {self.logsnr_max}")

    def __call__(
        self,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Draw σ of the given shape (float32; the tan is evaluated in float64)."""
        u = torch.rand(tuple(shape), generator=generator, device=device, dtype=torch.float32)
        t_min, t_max = _cosine_time(self.logsnr_max), _cosine_time(self.logsnr_min)
        # t ~ U[t_min, t_max]
        t = t_min + (t_max - t_min) * u.to(torch.float64)
        # σ = tan(π t / 2)
        return torch.tan(0.5 * math.pi * t).to(torch.float32)


SIGMA_DISTRIBUTIONS: dict[str, type] = {"lognormal": LogNormalSigma, "cosine": CosineLogSNRSigma}


def make_sigma_distribution(name: str, **kwargs: Any) -> LogNormalSigma | CosineLogSNRSigma:
    """Build a training σ distribution by name.

    Args:
        name: ``"lognormal"`` (EDM, :class:`LogNormalSigma`) or ``"cosine"``
            (DPDM's v-distribution, :class:`CosineLogSNRSigma`).
        **kwargs: Fields of the chosen dataclass.

    Raises:
        ValueError: For an unknown name.
    """
    try:
        cls = SIGMA_DISTRIBUTIONS[name]
    except KeyError:
        raise ValueError(f"unknown sigma distribution {name!r}; choose from {sorted(SIGMA_DISTRIBUTIONS)}") from None
    return cls(**kwargs)
