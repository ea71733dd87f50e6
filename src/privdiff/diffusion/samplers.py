"""Samplers for the probability-flow ODE / SDE of EDM (Karras et al. 2022).

k-diffusion protocol: a denoiser is any callable ``denoise(x, sigma) -> D`` with
``sigma`` a [B] tensor, and every sampler is
``sampler(denoise, x, sigmas, *, generator=None, callback=None, progress=False, ...)``
integrating from ``sigmas[0]`` down to ``sigmas[-1] = 0``. The σ schedule is float64;
x and the model calls stay in x's dtype (σ is cast with ``.to(x.dtype)`` for calls),
while step coefficients are formed from the float64 σ values. Samplers never clamp.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "karras_sigmas",
    "sample_euler",
    "sample_heun",
    "SAMPLERS",
    "sample",
    "guided_denoiser",
]

DenoiseFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]


def karras_sigmas(
    n: int,
    *,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """EDM time steps (eq. 5) with t_N = 0, in float64.

    σ_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ for i < n, σ_n = 0.
    ρ = 7 spends more steps near σ_min, where the ODE curvature is largest.

    Args:
        n: Number of sampling steps N ≥ 1 (the result has N + 1 entries).
        sigma_min: σ_{N−1}, the smallest nonzero noise level.
        sigma_max: σ_0, the initial noise level.
        rho: Schedule exponent ρ.
        device: Device of the result.

    Returns:
        Float64 tensor [σ_0 = σ_max, ..., σ_{N−1} = σ_min, 0] of length N + 1.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    if n == 1:
        sigmas = torch.tensor([sigma_max], dtype=torch.float64, device=device)
    else:
        i = torch.arange(n, dtype=torch.float64, device=device)
        max_inv_rho, min_inv_rho = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
        # σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ
        sigmas = (max_inv_rho + i / (n - 1) * (min_inv_rho - max_inv_rho)) ** rho
        # pin the end points exactly (pow round-off)
        sigmas[0], sigmas[-1] = sigma_max, sigma_min
    # t_N = 0
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _sigma_batch(sigma: float, x: Tensor) -> Tensor:
    """σ as a [B] tensor in x's dtype and device, for a model call."""
    return torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)


@torch.no_grad()
def sample_euler(
    denoise: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    **_: Any,
) -> Tensor:
    """Deterministic Euler on the probability-flow ODE dx/dσ = (x − D(x; σ))/σ (EDM eq. 4, Alg. 1 w/o correction).

    With σ(t) = t this is DDIM (Song et al. 2021) in σ-space, DPDM's "ddim" sampler.
    The last step to σ = 0 returns D(x; σ_{N−1}). ``generator`` and extra keyword
    arguments (e.g. ``S_churn``) are accepted and ignored, so all samplers share one
    signature.

    Args:
        denoise: ``denoise(x, sigma) -> D`` with ``sigma`` [B].
        x: Initial sample x_0 ~ N(0, σ_0² I).
        sigmas: Noise levels σ_0 > ... > σ_N = 0 (float64 preferred).
        generator: Unused.
        callback: Called after each denoiser evaluation with
            ``{"i", "x", "sigma", "denoised"}``.
        progress: Show a tqdm progress bar.

    Returns:
        The final sample at σ_N.
    """
    sigma_list = sigmas.tolist()
    for i in tqdm(range(len(sigma_list) - 1), disable=not progress):
        sigma_cur, sigma_next = sigma_list[i], sigma_list[i + 1]
        # D(x_i; σ_i)
        denoised = denoise(x, _sigma_batch(sigma_cur, x))
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "denoised": denoised})
        if sigma_next == 0:
            # step to σ = 0: x_{i+1} = x_i − σ_i·d_cur = D exactly
            x = denoised
            continue
        # d_cur = (x_i − D(x_i; σ_i)) / σ_i
        d_cur = (x - denoised) / sigma_cur
        # x_{i+1} = x_i + (σ_{i+1} − σ_i)·d_cur
        x = x + (sigma_next - sigma_cur) * d_cur
    return x


@torch.no_grad()
def sample_heun(
    denoise: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """EDM stochastic sampler (Algorithm 2): Heun's 2nd-order method with optional churn.

    With ``S_churn = 0`` this is the deterministic Heun ODE solver (Algorithm 1).
    With churn, each step first raises σ_i to σ̂ = σ_i(1 + γ) by adding fresh noise
    (Langevin-like correction of accumulated error), where
    γ = min(S_churn/N, √2 − 1) if S_min ≤ σ_i ≤ S_max else 0.

    Args:
        denoise: ``denoise(x, sigma) -> D`` with ``sigma`` [B].
        x: Initial sample x_0 ~ N(0, σ_0² I).
        sigmas: Noise levels σ_0 > ... > σ_N = 0 (float64 preferred).
        S_churn: Total stochasticity S_churn.
        S_min: Lowest σ_i at which churn is applied.
        S_max: Highest σ_i at which churn is applied.
        S_noise: Scale of the added noise (slightly > 1 offsets detail loss).
        generator: RNG for the churn noise ε (on x's device).
        callback: Called after the first denoiser evaluation of each step with
            ``{"i", "x", "sigma", "sigma_hat", "denoised"}`` (``x`` is x̂_i).
        progress: Show a tqdm progress bar.

    Returns:
        The final sample at σ_N.
    """
    sigma_list = sigmas.tolist()
    num_steps = len(sigma_list) - 1
    for i in tqdm(range(num_steps), disable=not progress):
        t_cur, t_next = sigma_list[i], sigma_list[i + 1]
        # γ_i = min(S_churn/N, √2 − 1) if S_min ≤ σ_i ≤ S_max else 0
        gamma = min(S_churn / num_steps, math.sqrt(2.0) - 1.0) if S_min <= t_cur <= S_max else 0.0
        # σ̂_i = σ_i + γ_i·σ_i
        t_hat = t_cur * (1.0 + gamma)
        if gamma > 0:
            # ε ~ N(0, S_noise² I);  x̂_i = x_i + √(σ̂_i² − σ_i²)·ε
            eps = S_noise * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_hat = x + math.sqrt(t_hat**2 - t_cur**2) * eps
        else:
            x_hat = x
        # D(x̂_i; σ̂_i)
        denoised = denoise(x_hat, _sigma_batch(t_hat, x_hat))
        if callback is not None:
            callback({"i": i, "x": x_hat, "sigma": sigmas[i], "sigma_hat": t_hat, "denoised": denoised})
        if t_next == 0:
            # Euler step to σ = 0: x̂_i + (0 − σ̂_i)·d_cur = D exactly; no correction
            x = denoised
            continue
        # d_cur = (x̂_i − D(x̂_i; σ̂_i)) / σ̂_i
        d_cur = (x_hat - denoised) / t_hat
        # Euler step: x_{i+1} = x̂_i + (σ_{i+1} − σ̂_i)·d_cur
        x_next = x_hat + (t_next - t_hat) * d_cur
        # d'_i = (x_{i+1} − D(x_{i+1}; σ_{i+1})) / σ_{i+1}
        d_prime = (x_next - denoise(x_next, _sigma_batch(t_next, x_next))) / t_next
        # 2nd-order correction: x_{i+1} = x̂_i + (σ_{i+1} − σ̂_i)·(½ d_cur + ½ d'_i)
        x = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "ddim": sample_euler,
    "heun": sample_heun,
    "edm": sample_heun,
}


def sample(
    denoise: DenoiseFn,
    *,
    shape: tuple[int, ...],
    sampler: str = "heun",
    steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    **sampler_kwargs: Any,
) -> Tensor:
    """Draw samples: x_0 ~ N(0, σ_max² I), Karras schedule (EDM eq. 5), then a sampler.

    Args:
        denoise: ``denoise(x, sigma) -> D`` with ``sigma`` [B]; see
            :func:`guided_denoiser` for class-conditional models.
        shape: Output shape [B, C, H, W].
        sampler: A key of :data:`SAMPLERS` ("euler"/"ddim" or "heun"/"edm").
        steps: Number of steps N.
        sigma_min: Smallest nonzero σ of the schedule.
        sigma_max: Initial σ.
        rho: Schedule exponent ρ.
        generator: RNG for x_0 and any sampler noise.
        device: Device of the samples (default: the generator's, else CPU).
        progress: Show a tqdm progress bar.
        **sampler_kwargs: Passed to the sampler (e.g. ``S_churn``).

    Returns:
        Final samples (float32, unclamped).

    Raises:
        ValueError: For an unknown sampler name.
    """
    try:
        sampler_fn = SAMPLERS[sampler]
    except KeyError:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(SAMPLERS)}") from None
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    sigmas = karras_sigmas(steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, device=device)
    # x_0 ~ N(0, σ_0² I)
    x = torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    x = x * sigmas[0].item()
    return sampler_fn(denoise, x, sigmas, generator=generator, progress=progress, **sampler_kwargs)


def guided_denoiser(
    denoiser: Callable[..., Tensor],
    labels: Tensor | None,
    *,
    guidance: float = 0.0,
    null_label: int | Tensor | None = None,
) -> DenoiseFn:
    """Bind labels (and classifier-free guidance) into a ``denoise(x, sigma)`` callable.

    D̃(x; σ, y) = (1 + w)·D(x; σ, y) − w·D(x; σ, ∅) with w = ``guidance`` (DPDM's
    convention; Ho & Salimans 2022). For w = 0 this is the plain conditional call;
    for w ≠ 0 the conditional and null rows go through ONE batched forward of 2B rows.

    Args:
        denoiser: ``denoiser(x, sigma, labels) -> D``.
        labels: Class labels [B], condition rows [B, …], or ``None`` for an unconditional
            model (guidance is then ignored).
        guidance: Guidance weight w.
        null_label: Label index of ∅, or the ∅ condition row; required when w ≠ 0.

    Returns:
        ``denoise(x, sigma) -> D̃`` following the k-diffusion protocol.
    """
    if labels is None:
        return lambda x, sigma: denoiser(x, sigma, None)
    if guidance == 0:
        return lambda x, sigma: denoiser(x, sigma, labels.to(x.device))
    if null_label is None:
        raise ValueError("classifier-free guidance (guidance != 0) needs null_label")
    w = float(guidance)
    # ∅ per row: the null label, or a null condition row (e.g. [no class, empty text])
    null_of = (
        (lambda y: torch.full_like(y, null_label))
        if isinstance(null_label, int)
        else (lambda y: torch.as_tensor(null_label, device=y.device, dtype=y.dtype).expand_as(y))
    )

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        batch = x.shape[0]
        y = labels.to(x.device)
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma = sigma.expand(batch) if sigma.ndim == 0 else sigma.reshape(-1)
        # one forward over [x; x] with labels [y; ∅]
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([y, null_of(y)]))
        D_cond, D_uncond = both[:batch], both[batch:]
        # D̃ = (1 + w)·D(x; σ, y) − w·D(x; σ, ∅)
        return (1.0 + w) * D_cond - w * D_uncond

    return denoise
