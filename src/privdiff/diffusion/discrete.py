"""Discrete-time DDPM objectives (ε- and v-prediction) in EDM's σ language.

A pretrained diffusers UNet keeps the objective it was trained with: a β schedule β_1..β_T
(its scheduler config), ᾱ_t = Π_{s≤t}(1 − β_s), the forward process

    x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε                        (Ho et al. 2020, eq. 4)

and a network that predicts ε (Ho et al. 2020, eq. 14) or v = √ᾱ_t·ε − √(1 − ᾱ_t)·x_0
(Salimans & Ho 2022, §4). Written as EDM's variance-preserving preconditioning (Karras et al.
2022, Table 1 "VP"; k-diffusion's ``DiscreteEpsDDPMDenoiser``), the same net is a denoiser
D(x; σ) on x = x_0 + σ·ε with

    σ_t = √((1 − ᾱ_t)/ᾱ_t),   α = 1/√(1 + σ²) (= √ᾱ_t),   x_t = α·x,

    ε-prediction:  D(x; σ) = x − σ·ε̂(α·x, t(σ))
    v-prediction:  D(x; σ) = α²·x − ασ·v̂(α·x, t(σ))

so privdiff's training loss, noise multiplicity and samplers apply unchanged: with σ drawn as
σ_t for t ~ U{0, …, T−1} (:class:`DiscreteSigma`) and the weight λ(σ) of
:meth:`VPDenoiser.loss_weight`, :func:`~.losses.denoising_loss` is exactly the DDPM objective
mean‖ε̂ − ε‖² (λ = 1/σ²) or mean‖v̂ − v‖² (λ = (1 + σ²)/σ²), per example and averaged over K draws.
t(σ) interpolates the discrete table in log σ, so it is the integer t at the table's σ_t.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["DiscreteSchedule", "DiscreteSigma", "VPDenoiser", "ddpm_sigma", "timestep_sigmas"]

Prediction = Literal["epsilon", "v_prediction"]
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class DiscreteSchedule:
    """A DDPM β schedule and what the net predicts, as a diffusers scheduler config states them.

    Args:
        num_train_timesteps: T.
        beta_start, beta_end: β_1 and β_T of the linear / scaled-linear schedules.
        beta_schedule: ``linear``, ``scaled_linear`` (linear in √β, Stable Diffusion's) or
            ``squaredcos_cap_v2`` (Nichol & Dhariwal's cosine ᾱ, β capped at 0.999).
        prediction_type: ``epsilon`` or ``v_prediction``.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: Prediction = "epsilon"

    def __post_init__(self) -> None:
        if (
            isinstance(self.num_train_timesteps, bool)
            or not isinstance(self.num_train_timesteps, int)
            or self.num_train_timesteps < 2
        ):
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps!r}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"beta_schedule {self.beta_schedule!r} is not supported (supported: {', '.join(BETA_SCHEDULES)})"
            )
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}")
        if not (
            0 < self.beta_start < 1
            and 0 < self.beta_end < 1
            and math.isfinite(self.beta_start)
            and math.isfinite(self.beta_end)
        ):
            raise ValueError(f"beta_start and beta_end must be in (0, 1), got {self.beta_start!r}, {self.beta_end!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DiscreteSchedule:
        """The schedule of a diffusers scheduler config (``scheduler_config.json`` or ``scheduler.config``).

        Refuses what this objective does not implement (trained_betas, zero-SNR rescaling,
        ``sample`` prediction) instead of training a different objective than the net's.
        """
        if config.get("trained_betas") is not None:
            raise ValueError("scheduler config gives trained_betas: not supported (use a named beta_schedule)")
        if config.get("rescale_betas_zero_snr"):
            raise ValueError("scheduler config asks for rescale_betas_zero_snr: not supported")
        return cls(
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            beta_start=float(config.get("beta_start", 0.0001)),
            beta_end=float(config.get("beta_end", 0.02)),
            beta_schedule=str(config.get("beta_schedule", "linear")),
            prediction_type=config.get("prediction_type", "epsilon"),
        )

    def betas(self) -> Tensor:
        """β_1..β_T, float64 [T]."""
        T = self.num_train_timesteps
        if self.beta_schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float64)
        if self.beta_schedule == "scaled_linear":  # linear in √β
            return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=torch.float64) ** 2
        # ᾱ(s) = cos²((s + 0.008)/1.008 · π/2), β_t = min(1 − ᾱ(t/T)/ᾱ((t−1)/T), 0.999)  (Nichol & Dhariwal 2021, eq. 17)
        s = torch.arange(T + 1, dtype=torch.float64) / T
        alpha_bar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)

    def alphas_cumprod(self) -> Tensor:
        """ᾱ_t = Π_{s≤t} (1 − β_s), float64 [T]."""
        return torch.cumprod(1 - self.betas(), 0)

    def sigmas(self) -> Tensor:
        """σ_t = √((1 − ᾱ_t)/ᾱ_t), increasing, float64 [T]."""
        a = self.alphas_cumprod()
        return ((1 - a) / a).sqrt()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """t(σ): the table's index, interpolated linearly in log σ (float64; exact integers at the table's σ_t)."""
        log_sigmas = self.sigmas().log().to(sigma.device)
        log_sigma = sigma.to(torch.float64).log().clamp(log_sigmas[0], log_sigmas[-1])
        high = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        low = high - 1
        w = (log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])
        return low.to(torch.float64) + w

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """σ(t): the inverse of :meth:`sigma_to_t` (log σ interpolated linearly between the table's integer t), float64."""
        log_sigmas = self.sigmas().log().to(t.device)
        t = torch.as_tensor(t, dtype=torch.float64, device=log_sigmas.device).clamp(0, len(log_sigmas) - 1)
        low = t.floor().long().clamp(max=len(log_sigmas) - 2)
        w = t - low.to(torch.float64)
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()


@dataclass(frozen=True)
class DiscreteSigma:
    """p_train(σ) of DDPM training: σ = σ_t with t ~ U{0, …, T−1} (float64, so t(σ) is exact)."""

    schedule: DiscreteSchedule

    def __call__(
        self,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        t = torch.randint(0, self.schedule.num_train_timesteps, tuple(shape), generator=generator, device=device)
        return self.schedule.sigmas().to(device)[t]


class VPDenoiser(nn.Module):
    """D(x; σ) of a discrete-time ε- or v-prediction net (see the module docstring).

    Args:
        net: ``net(x_t, t, cond)`` → ε̂ or v̂ with x_t [B, C, H, W] and t [B] (float timesteps;
            diffusers' UNets take them as they are).
        schedule: the net's own β schedule and prediction type.

    Like :class:`~.precond.Denoiser`, it owns no parameters or buffers of its own, only ``net``.
    """

    def __init__(self, net: nn.Module, *, schedule: DiscreteSchedule) -> None:
        super().__init__()
        self.net = net
        self.schedule = schedule

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """Denoise x at noise level σ (one per row, or a scalar); returns float32 like :class:`~.precond.Denoiser`."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(-1)
        if sigma.shape[0] != x.shape[0]:
            raise ValueError(f"sigma has {sigma.shape[0]} entries for a batch of {x.shape[0]}")
        view = (x.shape[0],) + (1,) * (x.ndim - 1)
        s = sigma.to(torch.float64)
        # α = 1/√(1 + σ²) = √ᾱ_t
        alpha = (1 / (1 + s * s).sqrt()).to(torch.float32).view(view)
        sig = s.to(torch.float32).view(view)
        # the net's own input: x_t = α·x at its timestep t(σ)
        out = self.net(alpha * x, self.schedule.sigma_to_t(s).to(torch.float32), cond).to(torch.float32)
        if self.schedule.prediction_type == "epsilon":
            # D = x − σ·ε̂
            return x - sig * out
        # D = α²·x − ασ·v̂
        return alpha * alpha * x - alpha * sig * out

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """λ(σ) making λ·‖D − x_0‖² the net's own loss: ‖ε̂ − ε‖² (λ = 1/σ²) or ‖v̂ − v‖² (λ = (1 + σ²)/σ²)."""
        s2 = sigma.to(torch.float64).square()
        w = 1 / s2 if self.schedule.prediction_type == "epsilon" else (1 + s2) / s2
        return w.to(torch.float32)

    def extra_repr(self) -> str:
        return f"schedule={self.schedule}"


def timestep_sigmas(denoiser: nn.Module) -> Tensor:
    """σ_t, t = 0..T−1 (float64), of the DDPM timesteps that attacks and proxies are defined on: a discrete-time
    net's own schedule (:class:`VPDenoiser`), DDPM's linear β schedule (T = 1000, :func:`ddpm_sigma`) for a
    privdiff EDM / v denoiser, which has no timesteps of its own."""
    return (denoiser.schedule if isinstance(denoiser, VPDenoiser) else DiscreteSchedule()).sigmas()


def ddpm_sigma(t: int, *, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> float:
    """σ_t = √(1/ᾱ_t − 1) of DDPM's linear β schedule (Ho et al. 2020), ᾱ_t = Π_{s≤t} (1 − β_s)."""
    if not 0 <= t < T:
        raise ValueError(f"timestep t must be in [0, {T}), got {t}")
    betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    alpha_bar = np.cumprod(1.0 - betas)[t]
    return float(math.sqrt(1.0 / alpha_bar - 1.0))
