"""Per-example denoising score-matching loss with noise multiplicity (DPDM §3.2).

EDM eq. 2/8: L(D) = E_{σ, y, n} λ(σ)·‖D(y + σn; σ) − y‖². DPDM draws K independent
(σ, n) pairs for every training example and averages the K losses *inside* that
example's loss, so DP-SGD still clips one gradient per example while the variance
of that gradient drops with K.

Row-ordering contract (relied on by the privacy code): the model batch has B·K
rows ordered sample-major, row ``b*K + k`` <-> (example b, draw k). Rows
``b*K .. b*K + K - 1`` all belong to example b.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .noise import SigmaDistribution

__all__ = ["draw_training_noise", "drop_labels", "denoising_loss"]


def draw_training_noise(
    x0: Tensor,
    *,
    K: int,
    sigma_dist: SigmaDistribution,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw K independent (σ, n) pairs per example (noise multiplicity, DPDM §3.2).

    σ is drawn first, then n, both from ``generator`` on ``x0``'s device.

    Args:
        x0: Clean images [B, C, H, W].
        K: Noise multiplicity (draws per example), K ≥ 1.
        sigma_dist: Training σ distribution, e.g. :class:`~.noise.LogNormalSigma`.
        generator: Optional RNG.

    Returns:
        ``(sigma, noise)``: σ [B, K] and n [B, K, C, H, W] ~ N(0, I) in ``x0``'s dtype.
    """
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    batch = x0.shape[0]
    # σ_bk ~ p_train(σ)
    sigma = sigma_dist((batch, K), generator=generator, device=x0.device)
    # n_bk ~ N(0, I)
    noise = torch.randn((batch, K, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype)
    return sigma, noise


def drop_labels(labels: Tensor, *, p: float, null_label: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by ``null_label`` with probability ``p``.

    Classifier-free guidance training (Ho & Salimans 2022): the same network learns
    the conditional and the unconditional (∅ = ``null_label``) denoiser. Works on any
    shape, e.g. [B] or per-draw labels [B, K].

    Args:
        labels: Integer labels, any shape.
        p: Drop probability in [0, 1].
        null_label: Label index standing for "no class".
        generator: Optional RNG (on ``labels``' device).

    Returns:
        A new tensor of the same shape and dtype as ``labels``.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    # drop_bk ~ Bernoulli(p)
    u = torch.rand(labels.shape, generator=generator, device=labels.device)
    drop = u < p
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def denoising_loss(
    denoiser: Callable[..., Tensor],
    x0: Tensor,
    labels: Tensor | None,
    *,
    sigma: Tensor,
    noise: Tensor,
    loss_weight: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Per-example EDM denoising loss averaged over K noise draws (EDM eq. 8, DPDM §3.2).

    Builds ONE model batch of B·K rows ordered sample-major: row ``b*K + k`` is
    (example b, draw k), i.e. y = ``x0.repeat_interleave(K, 0)``, input
    y + σ_bk·n_bk, label ``labels[b]`` (or ``labels[b, k]``). Runs the denoiser once,
    computes per row ℓ_bk = λ(σ_bk)·mean_{C,H,W}(D − y)², and returns
    ℓ_b = mean_k ℓ_bk. Backpropagating ``loss.sum()`` gives row gradients
    ∇(ℓ_bk / K); folding rows ``b*K .. b*K+K-1`` yields example b's gradient, the
    one gradient DP-SGD clips.

    Args:
        denoiser: ``denoiser(x, sigma, labels) -> D`` with ``sigma`` [B·K], e.g.
            :class:`~.precond.Denoiser` (possibly wrapped).
        x0: Clean images [B, C, H, W].
        labels: ``None``, [B], per-draw [B, K] (e.g. after :func:`drop_labels`), or
            per-draw condition rows [B, K, L] (e.g. DP-LDM's [label, tokens]).
        sigma: Noise levels [B, K].
        noise: Standard normal noise [B, K, C, H, W].
        loss_weight: λ(σ); defaults to ``denoiser.loss_weight`` (pass it explicitly
            when the denoiser is wrapped by something that hides that method).

    Returns:
        Per-example loss ℓ_b, shape [B].
    """
    if sigma.ndim != 2 or sigma.shape[0] != x0.shape[0]:
        raise ValueError(f"sigma must be [B, K] with B={x0.shape[0]}, got {tuple(sigma.shape)}")
    batch, K = sigma.shape
    if tuple(noise.shape) != (batch, K, *x0.shape[1:]):
        raise ValueError(f"noise must be {(batch, K, *x0.shape[1:])}, got {tuple(noise.shape)}")
    if loss_weight is None:
        loss_weight = denoiser.loss_weight  # type: ignore[attr-defined]

    # rows b*K + k <-> (example b, draw k)
    y = x0.repeat_interleave(K, dim=0)
    sigma_rows = sigma.reshape(batch * K)
    n = noise.reshape(batch * K, *x0.shape[1:])
    if labels is None:
        label_rows = None
    elif labels.shape == (batch,):
        label_rows = labels.repeat_interleave(K, dim=0)
    elif labels.shape == (batch, K):
        label_rows = labels.reshape(batch * K)
    elif labels.ndim == 3 and labels.shape[:2] == (batch, K):  # a condition row per draw, [B, K, L]
        label_rows = labels.reshape(batch * K, labels.shape[2])
    else:
        raise ValueError(f"labels must be None, [B], [B, K] or [B, K, L], got {tuple(labels.shape)}")

    view = (batch * K,) + (1,) * (x0.ndim - 1)
    # x = y + σ·n
    x = y + sigma_rows.view(view).to(y.dtype) * n
    # D(x; σ, labels), one forward over all B·K rows
    D = denoiser(x, sigma_rows, label_rows)
    # ℓ_bk = λ(σ_bk)·mean_{C,H,W}(D − y)²
    per_row = loss_weight(sigma_rows) * (D - y).square().flatten(1).mean(dim=1)
    # ℓ_b = mean_k ℓ_bk
    return per_row.view(batch, K).mean(dim=1)
