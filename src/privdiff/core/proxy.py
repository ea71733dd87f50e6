"""The learned attacker of PrivateLoRA (Luo et al., AAAI 2025, App. E): an MLP on the error map.

Feature (``feature="map"``, the paper's): the flattened element-wise squared error
e = (ε̂_θ(x₀ + σε, σ, c) − ε)², at one σ drawn from the model's training distribution (DDPM's
t ~ U{0..T−1}) and one fresh ε. Classifier h_ω: Linear(D→512) → ReLU → Dropout(0.5) →
Linear(512→256) → ReLU → Dropout(0.5) → Linear(256→2), trained with cross-entropy (class 1 = member).

``feature="loss"`` (privdiff's variant, not in the paper): the same MLP on [log mean(e), onehot(t)]
at one t drawn from the loss attack's Goldilocks timesteps (:data:`LOSS_TIMESTEPS`), one
fresh ε. Why: with a few dozen auxiliary images per class, the map MLP learns *which images* are in
member_aux (the map shows the digit's strokes) and does not generalise to other members. On
``runs/mia2/lora-mnist5k`` (plain LoRA, 64 + 64 auxiliary examples) h′ on maps scores AUC 0.55,
h′ on the loss feature 0.81 (64 members against 1,064 non-members, docs/benchmarks.md). A defense can only push against what its proxy sees.

The same :func:`proxy_features` serves the defenses (:mod:`privdiff.methods.lora`), where it must
stay inside the autograd graph of the trained parameters, and the attack h′ (:mod:`privdiff.attacks.proxy`),
trained from scratch on the auxiliary roles and scored on the held-out ones.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import PROXY_FEATURES
from ..diffusion import SigmaDistribution
from ..diffusion.discrete import ddpm_sigma

__all__ = ["LOSS_TIMESTEPS", "ProxyAttacker", "error_map", "feature_dim", "member_gain", "proxy_features"]

LOSS_TIMESTEPS: tuple[int, ...] = (
    50,
    100,
    200,
    300,
)  # the loss attack's t, Carlini's "Goldilocks zone" of DDPM's T = 1000


class ProxyAttacker(nn.Module):
    """h_ω: MLP [512, 256, 2] with ReLU and dropout 0.5 on a flattened error map (logits, class 1 = member)."""

    def __init__(self, in_features: int, *, hidden: tuple[int, int] = (512, 256), dropout: float = 0.5):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden[0]),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden[0], hidden[1]),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden[1], 2),
        )

    def forward(self, e: Tensor) -> Tensor:
        return self.mlp(e.flatten(1))


def error_map(
    eps_fn: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    x0: Tensor,
    cond: Tensor | None,
    *,
    sigma: Tensor,
    noise: Tensor,
) -> Tensor:
    """e = (ε̂(x₀ + σ·ε, σ, c) − ε)², element-wise, [B, C, H, W] in x₀'s dtype; differentiable in ``eps_fn``'s
    parameters. σ may be float64 (a discrete-time net's table σ_t, kept exact for its t(σ))."""
    view = (-1,) + (1,) * (x0.ndim - 1)
    # x_σ = x₀ + σ·ε
    x = x0 + sigma.view(view).to(x0.dtype) * noise
    return (eps_fn(x, sigma, cond).to(x0.dtype) - noise).square()


def _check_kind(kind: str) -> None:
    if kind not in PROXY_FEATURES:
        raise ValueError(f"unknown proxy feature {kind!r} (available: {', '.join(PROXY_FEATURES)})")


def feature_dim(kind: str, shape: tuple[int, ...]) -> int:
    """Input width of h_ω for ``kind`` on examples of ``shape`` (C, H, W)."""
    _check_kind(kind)
    return int(np.prod(shape)) if kind == "map" else 1 + len(LOSS_TIMESTEPS)


def proxy_features(
    eps_fn: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    x0: Tensor,
    cond: Tensor | None,
    *,
    kind: str,
    sigma_dist: SigmaDistribution,
    generator: torch.Generator,
    sigmas: Tensor | None = None,
) -> Tensor:
    """h_ω's input [B, D] for each example: one fresh (σ, ε) each; differentiable in ``eps_fn``'s parameters.

    ``map``: e = (ε̂(x₀ + σε, σ, c) − ε)² flattened, σ ~ ``sigma_dist``. ``loss``: [log mean(e), onehot(t)]
    with t uniform over :data:`LOSS_TIMESTEPS` and σ = σ_t of ``sigmas`` (the net's timestep table,
    :func:`~privdiff.diffusion.discrete.timestep_sigmas`; default DDPM's linear schedule).
    """
    _check_kind(kind)
    B = len(x0)
    if kind == "map":
        sigma = sigma_dist((B,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        return error_map(eps_fn, x0, cond, sigma=sigma, noise=noise).flatten(1)
    if sigmas is None:
        table = torch.tensor([ddpm_sigma(t) for t in LOSS_TIMESTEPS], dtype=x0.dtype, device=x0.device)
    else:
        table = sigmas[list(LOSS_TIMESTEPS)].to(dtype=x0.dtype, device=x0.device)
    # t ~ U(LOSS_TIMESTEPS), ε ~ N(0, I)
    k = torch.randint(0, len(LOSS_TIMESTEPS), (B,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    # log ‖ε̂(x₀ + σ_t ε, σ_t) − ε‖² / dim, and which t it was measured at
    log_err = error_map(eps_fn, x0, cond, sigma=table[k], noise=noise).flatten(1).mean(1).log()
    return torch.cat([log_err[:, None], F.one_hot(k, len(LOSS_TIMESTEPS)).to(x0.dtype)], dim=1)


def member_gain(attacker: ProxyAttacker, e: Tensor, *, member: bool = True) -> Tensor:
    """Per-example MI gain term log h_ω(e) (member) or log(1 − h_ω(e)) (non-member), [B]; G ≤ 0 (PrivateLoRA eq. 5)."""
    return F.log_softmax(attacker(e), dim=1)[:, 1 if member else 0]
