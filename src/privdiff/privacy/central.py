"""DPP's private release: noisy per-class "central" images (Li et al., DP-FETA / DPP).

One round:

1. Poisson-sample the private set with rate q (each example independently): batch 𝔅.
2. For each class c: S_c = Σ_{i ∈ 𝔅, y_i = c} d(x_i), where d is average pooling by ``downsample``
   (a convex combination of pixels, so d(x) stays in [0, 1]^{C·H'·W'}).
3. Divide by the *expected* class count m = ⌊q·N / num_classes⌋ (a constant: dividing by the
   realised count would make the sensitivity depend on the data): μ̂_c = S_c / m.
4. Release μ̃_c = μ̂_c + N(0, (σ·Δ)² I) for every class at once.

Sensitivity (add/remove one example, Opacus' neighbouring relation). Adding example (x, y) to the
data set changes, for a fixed sampling outcome that includes it, exactly one class sum, S_y, by
d(x), and no other: the classes partition the batch (parallel composition: all class means of a
round are ONE query). Hence the L2 change of the released vector (μ̂_1, …, μ̂_K) is

    ‖d(x)‖₂ / m ≤ √(C·H'·W') / m =: Δ,

since every coordinate of d(x) lies in [0, 1]. (Replacing one example instead, which is not the
ledger's relation, moves at most two class sums, each by ≤ Δ on its own block of coordinates, so
by ≤ √2·Δ; within one class by ≤ Δ, since every coordinate of d(x) − d(x') lies in [−1, 1].) With noise N(0, (σΔ)²) per coordinate and the
Poisson sampling, one round is the Poisson-subsampled Gaussian mechanism with noise multiplier σ
and rate q, exactly what DP-SGD's steps are, so R rounds enter the ledger as one event
(σ, q, R) and compose with DP-SGD in the same accountant. Clamping to [0, 1] afterwards and any
augmentation are post-processing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CentralRelease", "central_sensitivity", "class_means", "release_central_images", "release_parameters"]


@dataclass
class CentralRelease:
    """What :func:`release_central_images` released, and the parameters the ledger records."""

    images: Tensor  # [rounds·num_classes, C, H', W'] noisy class means, clamped to [0, 1]
    labels: Tensor  # [rounds·num_classes] the class of each
    noise_multiplier: float  # σ
    sample_rate: float  # q
    rounds: int  # R
    sensitivity: float  # Δ, the L2 sensitivity of one round's released vector
    expected_per_class: int  # m


def central_sensitivity(*, channels: int, height: int, width: int, expected_per_class: int) -> float:
    """Δ = √(C·H'·W') / m for images in [0, 1] of size C×H'×W' after downsampling (see the module docstring)."""
    if expected_per_class < 1:
        raise ValueError(f"expected examples per class must be >= 1, got {expected_per_class} (raise the batch size)")
    return math.sqrt(channels * height * width) / expected_per_class


def release_parameters(
    *,
    num_examples: int,
    num_classes: int,
    sample_rate: float,
    channels: int,
    height: int,
    width: int,
    downsample: int = 1,
) -> tuple[int, float]:
    """(m, Δ) of a release: expected examples per class ⌊q·N / classes⌋ and the L2 sensitivity for images of that size."""
    m = math.floor(sample_rate * num_examples / num_classes)
    return m, central_sensitivity(
        channels=channels, height=height // downsample, width=width // downsample, expected_per_class=m
    )


def class_means(
    images01: Tensor, labels: Tensor, mask: Tensor, *, num_classes: int, expected_per_class: int, downsample: int = 1
) -> Tensor:
    """The pre-noise query: μ̂_c = Σ_{i: mask_i, y_i = c} d(x_i) / m for every class, [num_classes, C, H', W']."""
    x = F.avg_pool2d(images01, downsample) if downsample > 1 else images01
    sums = torch.zeros(num_classes, *x.shape[1:], dtype=x.dtype, device=x.device)
    sums.index_add_(0, labels[mask], x[mask])
    return sums / expected_per_class


def release_central_images(
    images01: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    sample_rate: float,
    noise_multiplier: float,
    rounds: int,
    downsample: int = 1,
    generator: torch.Generator,
) -> CentralRelease:
    """R rounds of noisy per-class means of the private ``images01`` (values in [0, 1]); see the module docstring.

    The caller records the event (σ, q, R, Δ) in the ledger *before* calling this.
    """
    if images01.min() < 0 or images01.max() > 1:
        raise ValueError("central images are released from images in [0, 1]")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if noise_multiplier <= 0:
        raise ValueError("noise_multiplier must be > 0 (the release is private only with noise)")
    N, C, H, W = images01.shape
    m, delta = release_parameters(
        num_examples=N,
        num_classes=num_classes,
        sample_rate=sample_rate,
        channels=C,
        height=H,
        width=W,
        downsample=downsample,
    )
    out = []
    for _ in range(rounds):
        # Poisson sampling: each example in with probability q
        mask = torch.rand(N, generator=generator, device=images01.device) < sample_rate
        mu = class_means(images01, labels, mask, num_classes=num_classes, expected_per_class=m, downsample=downsample)
        # μ̃ = μ̂ + N(0, (σΔ)²)
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        out.append((mu + noise_multiplier * delta * noise).clamp(0, 1))  # clamping: post-processing
    return CentralRelease(
        images=torch.cat(out),
        labels=torch.arange(num_classes, device=images01.device).repeat(rounds),
        noise_multiplier=float(noise_multiplier),
        sample_rate=float(sample_rate),
        rounds=int(rounds),
        sensitivity=float(delta),
        expected_per_class=int(m),
    )
