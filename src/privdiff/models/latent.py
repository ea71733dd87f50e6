"""DP-LDM's denoiser network: a cross-attention ``UNet2DConditionModel`` on autoencoder latents,
conditioned on a class embedding and on text, and the choice of which parts are fine-tuned.

The condition of one row is a long vector ``[label, token_1 … token_L]``: the class embedder
turns the label (``num_classes`` = none) into one context token, the text encoder turns the
tokens (all ``<pad>`` = no text) into L more, and every cross-attention layer of the UNet attends
to those 1 + L tokens (Rombach et al. 2022; DP-LDM's ``ClassEmbedder`` + ``SpatialTransformer``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .text import HFTextEncoder, TextConfig, TextEncoder, WordTokenizer

__all__ = ["LatentUNetConfig", "LatentNet", "TRAINABLE_GROUPS", "build_latent_net", "select_trainable"]


@dataclass(frozen=True)
class LatentUNetConfig:
    """Size of the latent UNet; recipe keys under ``ldm.unet.``."""

    channels: tuple[int, ...] = (
        32,
    )  # block_out_channels; every level has cross-attention (one level: no downsampling at 7×7)
    layers_per_block: int = 1
    attention_heads: int = (
        1  # heads per attention layer (diffusers' UNet2DConditionModel calls this attention_head_dim)
    )
    norm_num_groups: int = 8


def build_latent_net(
    config: LatentUNetConfig, text_encoder: nn.Module, *, latent_channels: int, latent_size: int, num_classes: int
) -> "LatentNet":
    """A fresh :class:`LatentNet`: UNet with cross-attention to ``text_encoder.width``-wide tokens, class embedder with a null class."""
    n = len(config.channels)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(config.channels),
        layers_per_block=config.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=text_encoder.width,
        attention_head_dim=config.attention_heads,
        norm_num_groups=config.norm_num_groups,
        use_linear_projection=True,
    )
    return LatentNet(unet, nn.Embedding(num_classes + 1, text_encoder.width), text_encoder)


class LatentNet(nn.Module):
    """``net(x_in, c_noise, cond)`` for :class:`~privdiff.diffusion.Denoiser` on latents; ``cond`` is [R, 1 + L] long."""

    def __init__(self, unet: UNet2DConditionModel, class_embedder: nn.Embedding, text_encoder: TextEncoder):
        super().__init__()
        self.unet, self.class_embedder, self.text_encoder = unet, class_embedder, text_encoder

    @property
    def num_classes(self) -> int:
        return self.class_embedder.num_embeddings - 1

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Tensor) -> Tensor:
        # context = [e(label); T(tokens)]: 1 + L tokens for cross-attention
        context = torch.cat([self.class_embedder(cond[:, :1]), self.text_encoder(cond[:, 1:])], dim=1)
        return self.unet(x, c_noise.reshape(-1).to(x.dtype), encoder_hidden_states=context).sample

    # -- conditions ---------------------------------------------------------------------------
    def conditions(self, *, labels: Tensor | None = None, prompts: list[str] | None = None, n: int) -> Tensor:
        """[n, 1 + L] condition rows from class labels [n] and/or prompts (one, or n); none → unconditional."""
        cond = self.null_condition().repeat(n, 1)
        if labels is not None:
            cond[:, 0] = labels.to(torch.long)
        if prompts is not None:
            if len(prompts) not in (1, n):
                raise ValueError(f"{len(prompts)} prompts for {n} images (give 1 or {n})")
            ids = self.text_encoder.tokenizer.encode(list(prompts), warn=True)
            cond[:, 1:] = ids.expand(n, -1) if len(prompts) == 1 else ids
        return cond

    def null_condition(self) -> Tensor:
        """The condition of "no class, no text" [1 + L]: what classifier-free guidance contrasts with."""
        return torch.cat([torch.tensor([self.num_classes]), self.text_encoder.tokenizer.null_ids()])

    # -- files --------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """``path`` = a diffusers UNet directory, plus ``conditioner.safetensors`` and ``conditioner.json``."""
        path = Path(path)
        self.unet.save_pretrained(path, safe_serialization=True)
        state = {f"class_embedder.{k}": v for k, v in self.class_embedder.state_dict().items()}
        state |= {f"text_encoder.{k}": v for k, v in self.text_encoder.state_dict().items()}
        save_file({k: v.contiguous() for k, v in state.items()}, path / "conditioner.safetensors")
        meta = {
            "num_classes": self.num_classes,
            "text": dataclasses.asdict(self.text_encoder.config),
            "tokenizer": self.text_encoder.tokenizer.to_dict(),
        }
        (path / "conditioner.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "LatentNet":
        path = Path(path)
        meta = json.loads((path / "conditioner.json").read_text())
        text = TextConfig(**meta["text"])
        unet = UNet2DConditionModel.from_pretrained(
            path, local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False
        )
        encoder = (
            TextEncoder(WordTokenizer.from_dict(meta["tokenizer"]), text)
            if text.encoder == "builtin"
            else HFTextEncoder(text)
        )
        net = cls(unet, nn.Embedding(meta["num_classes"] + 1, text.width), encoder)
        state = load_file(path / "conditioner.safetensors")
        net.class_embedder.load_state_dict(
            {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("class_embedder.")}
        )
        net.text_encoder.load_state_dict(
            {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("text_encoder.")}
        )
        return net


TRAINABLE_GROUPS = {
    "attentions": "the UNet's transformer blocks (self- and cross-attention, their norms, projections and feed-forward)",
    "cross_attention": "the cross-attention layers only (attn2)",
    "self_attention": "the self-attention layers only (attn1)",
    "class_embedder": "the class embedding",
    "text_encoder": "the whole text encoder",
    "unet": "the whole UNet",
}


def _in_group(name: str, group: str) -> bool:
    parts = name.split(".")
    if group == "attentions":
        return parts[0] == "unet" and "attentions" in parts
    if group == "cross_attention":
        return parts[0] == "unet" and "attn2" in parts
    if group == "self_attention":
        return parts[0] == "unet" and "attn1" in parts
    if group in ("class_embedder", "text_encoder", "unet"):
        return parts[0] == group
    return fnmatch.fnmatchcase(name, group)  # a parameter-name pattern, e.g. "unet.conv_in.*"


def select_trainable(net: nn.Module, groups: tuple[str, ...]) -> tuple[int, int]:
    """Make exactly the parameters in ``groups`` (names of :data:`TRAINABLE_GROUPS` or parameter-name
    patterns) trainable and freeze the rest; returns (trainable, total) parameter counts."""
    names = dict(net.named_parameters())
    for group in groups:
        if not any(_in_group(n, group) for n in names):
            known = ", ".join(TRAINABLE_GROUPS)
            raise ValueError(
                f"ldm.trainable: '{group}' matches no parameter (groups: {known}; or a pattern like 'unet.conv_in.*')"
            )
    for n, p in names.items():
        p.requires_grad_(any(_in_group(n, g) for g in groups))
    return sum(p.numel() for p in names.values() if p.requires_grad), sum(p.numel() for p in names.values())
