"""Threshold attacks on a diffusion model, written in privdiff's σ-space (higher score = "member").

DDPM attacks are defined on timesteps t of a VP chain x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε. Dividing by
√ᾱ_t gives privdiff's x = x₀ + σ_t·ε with σ_t = √(1/ᾱ_t − 1), and the DDIM step t → s is exactly
the Euler step of the probability-flow ODE, x_s = x_t + (σ_s − σ_t)·ε̂(x_t, σ_t). So each attack
keeps its paper's t, on the net's own β schedule for a pretrained discrete-time net (a user's UNet or
pipeline: SD's scaled-linear table) and on DDPM's linear one (1e-4 → 0.02, T = 1000, :func:`ddpm_sigma`)
for privdiff's EDM / v denoisers (:attr:`.target.Target.sigmas`), through ε̂ (see :mod:`.target`);
the scaling by √ᾱ_t is the same for every example and does not change any ranking.

* loss (Matsumoto et al. 2023; Carlini et al. 2023): −mean_{t, k} ‖ε_k − ε̂(x₀ + σ_t ε_k, σ_t)‖²
* SecMI_stat (Duan et al., ICML 2023): −‖ψ(φ(x̃_{t_sec−k}), t_sec) − x̃_{t_sec−k}‖², x̃ by deterministic DDIM inversion
* PIA (Kong et al., ICLR 2024): −‖ε̂₀ − ε̂(x₀ + σ_t ε̂₀, σ_t)‖₄⁴ with ε̂₀ = ε̂(x₀, σ_0)
* PIAN: PIA with ε̂₀ rescaled to the mean |·| of a standard normal, √(2/π)
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core.proxy import LOSS_TIMESTEPS
from ..diffusion.discrete import ddpm_sigma
from .target import Target

__all__ = ["LOSS_TIMESTEPS", "ddpm_sigma", "loss_scores", "secmi_scores", "pia_scores"]


def _batches(target: Target, x0: Tensor, cond: Tensor | None, desc: str, progress: bool):
    B = target.batch_size
    for i in tqdm(range(0, len(x0), B), desc=desc, unit="batch", disable=not progress, file=sys.stderr, leave=False):
        yield x0[i : i + B], None if cond is None else cond[i : i + B]


@torch.no_grad()
def loss_scores(
    target: Target,
    x0: Tensor,
    cond: Tensor | None,
    *,
    timesteps: tuple[int, ...] = LOSS_TIMESTEPS,
    draws: int = 4,
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Loss attack: s(x₀) = −mean over t ∈ ``timesteps`` and ``draws`` noises of ‖ε − ε̂(x₀ + σ_t ε, σ_t)‖² / dim."""
    g = torch.Generator(device=target.device).manual_seed(seed)
    out = []
    for x, c in _batches(target, x0, cond, "loss attack", progress):
        err = torch.zeros(len(x), device=x.device)
        for t in timesteps:
            sigma = target.sigma(t)
            for _ in range(draws):
                # ε ~ N(0, I);  x_t = x₀ + σ_t·ε
                eps = torch.randn(x.shape, generator=g, device=x.device)
                err += (target.eps(x + sigma * eps, sigma, c) - eps).square().flatten(1).mean(1)
        out.append(-(err / (len(timesteps) * draws)).cpu())
    return torch.cat(out).double().numpy()


@torch.no_grad()
def secmi_scores(
    target: Target, x0: Tensor, cond: Tensor | None, *, t_sec: int = 100, k: int = 10, progress: bool = False
) -> np.ndarray:
    """SecMI_stat: the t-error after deterministic DDIM inversion to t_sec − k, one step up and one back.

    Official procedure (``jinhaoduan/SecMI``): invert x₀ over t = 0, k, …, t_sec − k to x̃; φ: one DDIM
    step t_sec − k → t_sec; ψ: one step back; s = −‖ψ(φ(x̃)) − x̃‖² (t_sec = 100, k = 10).
    """
    if t_sec % k or t_sec < 2 * k:
        raise ValueError(f"t_sec must be a multiple of k and >= 2k, got t_sec={t_sec}, k={k}")
    sig = [target.sigma(t) for t in range(0, t_sec + 1, k)]  # σ_0, σ_k, …, σ_{t_sec}
    out = []
    for x, c in _batches(target, x0, cond, "SecMI", progress):
        # x̃ = Φ(x₀, t_sec − k): DDIM inversion x_{s} = x_t + (σ_s − σ_t)·ε̂(x_t, σ_t)
        y = x
        for a, b in zip(sig[:-2], sig[1:-1]):
            y = y + (b - a) * target.eps(y, a, c)
        x_tilde = y
        # φ: t_sec − k → t_sec
        up = x_tilde + (sig[-1] - sig[-2]) * target.eps(x_tilde, sig[-2], c)
        # ψ: t_sec → t_sec − k
        back = up + (sig[-2] - sig[-1]) * target.eps(up, sig[-1], c)
        # t-error ℓ̃ = ‖ψ(φ(x̃)) − x̃‖²
        out.append(-(back - x_tilde).square().flatten(1).sum(1).cpu())
    return torch.cat(out).double().numpy()


@torch.no_grad()
def pia_scores(
    target: Target,
    x0: Tensor,
    cond: Tensor | None,
    *,
    t: int = 200,
    p: int = 4,
    normalized: bool = False,
    progress: bool = False,
) -> np.ndarray:
    """PIA (``normalized=False``) or PIAN: proximal initialisation ε̂₀ = ε̂(x₀, σ_0), then
    s = −Σ|ε̂₀ − ε̂(x₀ + σ_t·ε̂₀, σ_t)|^p (the official code's sum without the root; t = 200, p = 4).

    PIAN replaces ε̂₀ by ε̂₀·√(2/π)/mean|ε̂₀|, so its mean absolute value is that of N(0, 1) noise.
    """
    s0, st = target.sigma(0), target.sigma(t)
    out = []
    for x, c in _batches(target, x0, cond, "PIAN" if normalized else "PIA", progress):
        # ε̂₀ = ε_θ(x₀, 0)
        eps0 = target.eps(x, s0, c)
        if normalized:
            eps0 = (
                eps0
                * math.sqrt(2 / math.pi)
                / eps0.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, *([1] * (x.ndim - 1)))
            )
        # x_t = x₀ + σ_t·ε̂₀ (the deterministic trajectory's point at t)
        eps_t = target.eps(x + st * eps0, st, c)
        out.append(-(eps0 - eps_t).abs().pow(p).flatten(1).sum(1).cpu())
    return torch.cat(out).double().numpy()
