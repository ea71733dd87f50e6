"""An HE-friendly text-conditioned latent denoiser for private-mode inference (DP-LDM latents).

Every layer that carries weights is a ``Linear`` (a matrix product a server can evaluate on
ciphertexts, plaintext weights × encrypted activations); everything between them is weight-free
and evaluated by the client on what it decrypts:

    φ = [cos 2πf_k c, sin 2πf_k c]                       Fourier features of c_noise (fixed f_k)
    h = W_in [x; φ] + b_in                               x: the flattened latent
    per block b:
      a = LN(h)                                          LayerNorm without affine (client)
      q = W_q a;  K = W_k ctx;  V = W_v ctx              ctx: class token + text tokens
      o = softmax(q Kᵀ/√d) V  (per head; client)         cross-attention from the latent to the prompt
      h = h + W_o o + b_o
      h = h + W_2 SiLU(W_1 LN(h) + b_1) + b_2            SiLU on the client
    F = W_out LN(h) + b_out

The network is DP-LDM's :class:`~privdiff.models.latent.LatentNet` with this core in place of the
UNet (attribute ``unet``, so DP-LDM's trainable groups still name its parts: ``attentions`` are the
cross-attention layers, ``unet`` the whole core). Recipe: ``ldm.net: he`` with sizes under ``ldm.he``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .latent import LatentNet
from .text import HFTextEncoder, TextConfig, TextEncoder, WordTokenizer

__all__ = [
    "HENetConfig",
    "HECore",
    "HENet",
    "attend",
    "build_he_net",
    "core_forward",
    "fourier_features",
    "keys_values",
]


@dataclass(frozen=True)
class HENetConfig:
    """Size of the HE-friendly denoiser; recipe keys under ``ldm.he.``."""

    width: int = 128  # H: the residual stream
    blocks: int = 2
    heads: int = 4
    head_dim: int = 16
    mlp_ratio: int = 2  # MLP hidden units = mlp_ratio·H
    fourier: int = 8  # frequencies of the c_noise features (2·fourier features)


def fourier_features(c_noise: Tensor, n: int) -> Tensor:
    """φ(c) = [cos 2πf_k c, sin 2πf_k c] with fixed f_k = 2^k/4, k < n: [R] → [R, 2n] (no weights)."""
    f = torch.exp2(torch.arange(n, dtype=c_noise.dtype, device=c_noise.device)) / 4
    angle = 2 * math.pi * c_noise[:, None] * f
    return torch.cat([angle.cos(), angle.sin()], dim=1)


class _CrossAttention(nn.Module):
    def __init__(self, width: int, context_width: int, heads: int, head_dim: int):
        super().__init__()
        A = heads * head_dim
        self.to_q, self.to_out = nn.Linear(width, A, bias=False), nn.Linear(A, width)
        self.to_k, self.to_v = nn.Linear(context_width, A, bias=False), nn.Linear(context_width, A, bias=False)


class _MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)


class HECore(nn.Module):
    """F(x_in, c_noise, ctx) of the module docstring; ``latent_shape`` = (C, H, W)."""

    def __init__(self, config: HENetConfig, *, latent_shape: tuple[int, int, int], context_width: int):
        super().__init__()
        self.config, self.latent_shape, self.context_width = config, tuple(latent_shape), int(context_width)
        D, H = math.prod(latent_shape), config.width
        self.proj_in = nn.Linear(D + 2 * config.fourier, H)
        self.attentions = nn.ModuleList(
            _CrossAttention(H, context_width, config.heads, config.head_dim) for _ in range(config.blocks)
        )
        self.mlps = nn.ModuleList(_MLP(H, config.mlp_ratio * H) for _ in range(config.blocks))
        self.proj_out = nn.Linear(H, D)

    def layers(self) -> dict[str, nn.Linear]:
        """The weighted layers by name: ``in``, ``q{b}``, ``k{b}``, ``v{b}``, ``o{b}``, ``fc1_{b}``, ``fc2_{b}``, ``out``."""
        out = {"in": self.proj_in}
        for b, (attn, mlp) in enumerate(zip(self.attentions, self.mlps)):
            out |= {
                f"q{b}": attn.to_q,
                f"k{b}": attn.to_k,
                f"v{b}": attn.to_v,
                f"o{b}": attn.to_out,
                f"fc1_{b}": mlp.fc1,
                f"fc2_{b}": mlp.fc2,
            }
        return out | {"out": self.proj_out}

    def linear(self, names: tuple[str, ...], a: Tensor) -> Tensor:
        """The layers ``names`` applied to the same input, outputs concatenated (plaintext evaluation)."""
        layers = self.layers()
        return torch.cat([layers[n](a) for n in names], dim=-1)

    def forward(self, x: Tensor, c_noise: Tensor, context: Tensor) -> Tensor:
        kv = keys_values(self.config, context, self.linear)
        return core_forward(self.config, self.latent_shape, x, c_noise, kv, self.linear)

    def save_pretrained(self, path: str | Path, **_) -> None:
        """``he_net.json`` (sizes) and ``he_net.safetensors`` (weights) in directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "config": asdict(self.config),
            "latent_shape": list(self.latent_shape),
            "context_width": self.context_width,
        }
        (path / "he_net.json").write_text(json.dumps(meta, indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path / "he_net.safetensors")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "HECore":
        path = Path(path)
        meta = json.loads((path / "he_net.json").read_text())
        core = cls(
            HENetConfig(**meta["config"]), latent_shape=tuple(meta["latent_shape"]), context_width=meta["context_width"]
        )
        core.load_state_dict(load_file(path / "he_net.safetensors"))
        return core


Linear = Callable[[tuple[str, ...], Tensor], Tensor]
"""``linear(names, a)``: the weighted layers ``names`` of the core applied to ``a`` [..., n_in], concatenated."""


def attend(config: HENetConfig, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """o = softmax(q Kᵀ/√d) V per head: q [R, A], k and v [R, T, A] → [R, A] (weight-free)."""
    R, T, A = k.shape
    n, d = config.heads, config.head_dim
    q, k, v = q.view(R, n, 1, d), k.view(R, T, n, d).transpose(1, 2), v.view(R, T, n, d).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # [R, n, 1, T]
    return (w @ v).reshape(R, A)


def keys_values(config: HENetConfig, context: Tensor, linear: Linear) -> list[tuple[Tensor, Tensor]]:
    """(K_b, V_b) = (W_k ctx, W_v ctx) of every block, from one stacked layer call on ctx [R, T, w]."""
    A = config.heads * config.head_dim
    names = tuple(n for b in range(config.blocks) for n in (f"k{b}", f"v{b}"))
    kv = linear(names, context)  # [R, T, 2·blocks·A]
    return [
        (kv[..., 2 * b * A : (2 * b + 1) * A], kv[..., (2 * b + 1) * A : (2 * b + 2) * A]) for b in range(config.blocks)
    ]


def core_forward(
    config: HENetConfig,
    latent_shape: tuple[int, ...],
    x: Tensor,
    c_noise: Tensor,
    kv: list[tuple[Tensor, Tensor]],
    linear: Linear,
) -> Tensor:
    """F(x, c_noise; K, V) of the module docstring with the weighted layers behind ``linear``: the
    plaintext network and the private-mode client run this same code (the client's ``linear`` is a
    round trip to the server on ciphertexts)."""
    R, H = x.shape[0], config.width
    # h = W_in [x; φ(c_noise)] + b_in
    h = linear(("in",), torch.cat([x.reshape(R, -1), fourier_features(c_noise, config.fourier)], dim=1))
    for b, (k, v) in enumerate(kv):
        # h ← h + W_o softmax(W_q LN(h) Kᵀ/√d) V + b_o
        q = linear((f"q{b}",), F.layer_norm(h, (H,)))
        h = h + linear((f"o{b}",), attend(config, q, k, v))
        # h ← h + W_2 SiLU(W_1 LN(h) + b_1) + b_2
        h = h + linear((f"fc2_{b}",), F.silu(linear((f"fc1_{b}",), F.layer_norm(h, (H,)))))
    # F = W_out LN(h) + b_out
    return linear(("out",), F.layer_norm(h, (H,))).view(R, *latent_shape)


class HENet(LatentNet):
    """DP-LDM's latent network (class embedder, text encoder, conditions) with an :class:`HECore` as denoiser."""

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.unet.latent_shape

    def context(self, cond: Tensor) -> Tensor:
        """ctx = [e(label); T(tokens)]: [R, 1 + L, width] from condition rows [R, 1 + L]."""
        return torch.cat([self.class_embedder(cond[:, :1]), self.text_encoder(cond[:, 1:])], dim=1)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Tensor) -> Tensor:
        return self.unet(x, c_noise.reshape(-1).to(x.dtype), self.context(cond))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "HENet":
        path = Path(path)
        meta = json.loads((path / "conditioner.json").read_text())
        text = TextConfig(**meta["text"])
        encoder = (
            TextEncoder(WordTokenizer.from_dict(meta["tokenizer"]), text)
            if text.encoder == "builtin"
            else HFTextEncoder(text)
        )
        net = cls(HECore.from_pretrained(path), nn.Embedding(meta["num_classes"] + 1, text.width), encoder)
        state = load_file(path / "conditioner.safetensors")
        net.class_embedder.load_state_dict(
            {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("class_embedder.")}
        )
        net.text_encoder.load_state_dict(
            {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("text_encoder.")}
        )
        return net


def build_he_net(
    config: HENetConfig, text_encoder: nn.Module, *, latent_channels: int, latent_size: int, num_classes: int
) -> HENet:
    """A fresh :class:`HENet` on latents [latent_channels, latent_size, latent_size] (as ``build_latent_net``)."""
    core = HECore(config, latent_shape=(latent_channels, latent_size, latent_size), context_width=text_encoder.width)
    return HENet(core, nn.Embedding(num_classes + 1, text_encoder.width), text_encoder)
