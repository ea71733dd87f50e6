"""The denoiser network: a small diffusers ``UNet2DModel`` adapted to the EDM ``net`` protocol."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DModel
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    """Size of the UNet; every field is a recipe key under ``model.``."""

    channels: tuple[int, ...] = (32, 64, 64)  # block_out_channels; len = number of resolutions
    layers_per_block: int = 1
    attention_levels: tuple[int, ...] = (2,)  # which resolution levels (0 = full) get self-attention
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    dropout: float = 0.0
    # a user's own diffusers UNet2DModel directory (with its scheduler config) or pipeline directory, fine-tuned
    # instead of a UNet built from the sizes above (method: dp-finetune; privdiff.models.pretrained)
    pretrained: str | None = None
    # what of a pretrained UNet trains: groups of privdiff.models.pretrained.TRAINABLE_GROUPS or parameter-name patterns
    trainable: tuple[str, ...] = ("all",)
    # model.trainable: [lora] trains LoRA adapters (peft) of this rank and scale alpha/rank on these modules
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


def build_unet(config: UNetConfig, *, resolution: int, in_channels: int, num_classes: int | None) -> UNet2DModel:
    """A class-conditional (or unconditional) ``UNet2DModel``; label ``num_classes`` is the CFG null label.

    The time input is EDM's ``c_noise`` (a float per example, positional embedding). Attention
    blocks at ``attention_levels`` are diffusers' ``AttnDownBlock2D``/``AttnUpBlock2D``; the mid
    block always has attention. The model holds no BatchNorm and no buffers, so Opacus accepts it.
    """
    n = len(config.channels)
    if resolution % 2 ** (n - 1):
        raise ValueError(f"resolution {resolution} is not divisible by 2^{n - 1} (model.channels has {n} levels)")
    if any(not 0 <= lvl < n for lvl in config.attention_levels):
        raise ValueError(f"model.attention_levels must be in [0, {n}), got {list(config.attention_levels)}")
    down = tuple("AttnDownBlock2D" if i in config.attention_levels else "DownBlock2D" for i in range(n))
    up = tuple("AttnUpBlock2D" if i in config.attention_levels else "UpBlock2D" for i in reversed(range(n)))
    return UNet2DModel(
        sample_size=resolution,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(config.channels),
        layers_per_block=config.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
        dropout=config.dropout,
        num_class_embeds=None if num_classes is None else num_classes + 1,
    )


class UNetNet(nn.Module):
    """Adapter from ``UNet2DModel`` to the ``net(x_in, c_noise, labels)`` protocol of ``Denoiser``."""

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        self.unet = unet

    @property
    def num_classes(self) -> int | None:
        n = self.unet.config.num_class_embeds
        return None if n is None else n - 1

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes is None:
            labels = None
        return self.unet(x, c_noise.reshape(-1).to(x.dtype), class_labels=labels).sample

    def conditions(
        self, *, labels: torch.Tensor | None = None, prompts: list[str] | None = None, n: int
    ) -> torch.Tensor | None:
        """The condition of ``n`` rows: the class labels themselves (this model reads no text)."""
        if prompts is not None:
            raise ValueError("this model has no text encoder: use --label (text prompts need a DP-LDM run)")
        return labels

    def null_condition(self) -> int | None:
        """The CFG null label (``num_classes``)."""
        return self.num_classes

    def save_pretrained(self, path) -> None:
        self.unet.save_pretrained(path, safe_serialization=True)

    @classmethod
    def from_pretrained(cls, path) -> "UNetNet":
        return cls(
            UNet2DModel.from_pretrained(path, local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False)
        )


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
