"""DPP's augmentation bag, in plain torch: what turns a few dozen noisy central images into a data set.

Post-processing of released images, so it costs no privacy. As DP-FETA: a 3×3 median blur and
a sharpening kernel first (they undo some of the release noise), then for each copy a
RandAugment-style draw of ``num_ops`` operations at a random magnitude ≤ ``magnitude`` out of
geometric (rotate, shear, translate, scale) and photometric (brightness, contrast, sharpness,
posterize-like quantisation) ones. Images are [N, C, H, W] in [0, 1]; every output stays so.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["augment_copies", "median_blur", "sharpen"]


def median_blur(x: Tensor) -> Tensor:
    """3×3 median filter (replicate-padded)."""
    patches = F.unfold(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3)  # [N, C·9, H·W]
    N, C, H, W = x.shape
    return patches.view(N, C, 9, H * W).median(dim=2).values.view(N, C, H, W)


def sharpen(x: Tensor) -> Tensor:
    """The kernel [[0, −1, 0], [−1, 5, −1], [0, −1, 0]] per channel, clamped to [0, 1]."""
    k = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 5.0, -1.0], [0.0, -1.0, 0.0]], dtype=x.dtype, device=x.device)
    C = x.shape[1]
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(C, 1, 3, 3), groups=C).clamp(0, 1)


def _affine(x: Tensor, angle: Tensor, shear: Tensor, tx: Tensor, ty: Tensor, scale: Tensor) -> Tensor:
    """Per-image affine warp (radians, fractions of the image), zero (black) fill, bilinear."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [
            torch.stack([cos / scale, (-sin + shear) / scale, tx], dim=1),
            torch.stack([sin / scale, cos / scale, ty], dim=1),
        ],
        dim=1,
    )  # [N, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _op(x: Tensor, op: int, m: Tensor, sign: Tensor) -> Tensor:
    """One operation at strength m ∈ [0, 1] per image (sign ±1 picks the direction)."""
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    if op == 0:  # rotate up to 30°
        return _affine(x, sign * m * math.radians(30), zero, zero, zero, one)
    if op == 1:  # shear up to 0.3
        return _affine(x, zero, sign * m * 0.3, zero, zero, one)
    if op == 2:  # translate x up to 15 %
        return _affine(x, zero, zero, sign * m * 0.3, zero, one)
    if op == 3:  # translate y up to 15 %
        return _affine(x, zero, zero, zero, sign * m * 0.3, one)
    if op == 4:  # scale 0.8 … 1.2
        return _affine(x, zero, zero, zero, zero, 1 + sign * m * 0.2)
    v = m.view(-1, 1, 1, 1)
    s = sign.view(-1, 1, 1, 1)
    if op == 5:  # brightness ×(1 ± 0.5m)
        return (x * (1 + s * 0.5 * v)).clamp(0, 1)
    if op == 6:  # contrast around the image mean ×(1 ± 0.5m)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return ((x - mean) * (1 + s * 0.5 * v) + mean).clamp(0, 1)
    if op == 7:  # sharpness: blend towards the sharpened image
        return (x + v * (sharpen(x) - x)).clamp(0, 1)
    # op 8: posterize-like quantisation to 2^(8 − 6m) levels
    levels = (2 ** (8 - 6 * v)).round()
    return (x * (levels - 1)).round() / (levels - 1)


NUM_OPS = 9


def augment_copies(
    images: Tensor,
    labels: Tensor,
    *,
    copies: int,
    num_ops: int = 2,
    magnitude: int = 9,
    generator: torch.Generator,
    denoise: bool = True,
) -> tuple[Tensor, Tensor]:
    """``copies`` augmented versions of every image (RandAugment-style, magnitude ~ U{1..magnitude} of 10 per copy).

    Returns ([copies·N, C, H, W] in [0, 1], their labels). ``denoise`` applies the median blur and
    the sharpening first, as DP-FETA does to released images.
    """
    x = sharpen(median_blur(images)) if denoise else images
    reps = x.repeat(copies, 1, 1, 1)
    out = reps.clone()
    n = reps.shape[0]
    for _ in range(num_ops):
        ops = torch.randint(0, NUM_OPS, (n,), generator=generator)
        m = torch.randint(1, magnitude + 1, (n,), generator=generator).to(x.dtype) / 10
        sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).to(x.dtype)
        for op in range(NUM_OPS):
            idx = (ops == op).nonzero().flatten()
            if len(idx):
                out[idx] = _op(out[idx], op, m[idx].to(x.device), sign[idx].to(x.device))
    return out.clamp(0, 1), labels.repeat(copies)
