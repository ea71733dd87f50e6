"""The latent space of DP-LDM: a small diffusers ``AutoencoderKL`` and its per-example loss.

Rombach et al. 2022 (latent diffusion) train a KL-regularised autoencoder once and run diffusion
on its latents. Here it is sized for 28×28 digits: ``channels`` has one entry per resolution,
so (32, 64, 64) maps 28 → 14 → 7, a 4×7×7 latent (16× fewer values than pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from torch import Tensor

__all__ = ["AutoencoderConfig", "autoencoder_loss", "build_autoencoder", "encode_latents"]


@dataclass(frozen=True)
class AutoencoderConfig:
    """Autoencoder size and its (public) training; recipe keys under ``ldm.autoencoder.``."""

    channels: tuple[int, ...] = (32, 64, 64)  # block_out_channels; len − 1 downsamplings
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 8
    kl_weight: float = 1e-4  # β of the KL term (latent diffusion uses 1e-6 with a perceptual loss)
    epochs: float = 40.0
    batch_size: int = 64
    lr: float = 1e-3


def build_autoencoder(config: AutoencoderConfig, *, in_channels: int, resolution: int) -> AutoencoderKL:
    """A fresh ``AutoencoderKL`` (no mid-block attention: at 7×7 it buys nothing)."""
    n = len(config.channels)
    if resolution % 2 ** (n - 1):
        raise ValueError(
            f"resolution {resolution} is not divisible by 2^{n - 1} (ldm.autoencoder.channels has {n} levels)"
        )
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(config.channels),
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=resolution,
        mid_block_add_attention=False,
        scaling_factor=1.0,
    )


def autoencoder_loss(
    ae: AutoencoderKL, x: Tensor, *, kl_weight: float, generator: torch.Generator | None = None
) -> Tensor:
    """Per-example loss ‖Dec(z) − x‖² (mean over pixels) + β·KL(q(z|x) ‖ N(0, I)) (mean over latent values), z ~ q(z|x)."""
    posterior = ae.encode(x).latent_dist
    # z = μ + σ·ε (reparameterised)
    z = posterior.sample(generator=generator)
    # x̂ = Dec(z)
    x_hat = ae.decode(z).sample
    # KL(N(μ, σ²) ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − ln σ²)
    kl = 0.5 * (posterior.mean.square() + posterior.var - 1.0 - posterior.logvar).flatten(1).mean(1)
    return (x_hat - x).square().flatten(1).mean(1) + kl_weight * kl


@torch.no_grad()
def encode_latents(ae: AutoencoderKL, images: Tensor, *, batch_size: int = 500) -> Tensor:
    """Scaled posterior means s·μ(x) of ``images`` [N, C, H, W] in [-1, 1] (s = ``ae.config.scaling_factor``)."""
    out = [ae.encode(images[i : i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)]
    return torch.cat(out) * ae.config.scaling_factor
