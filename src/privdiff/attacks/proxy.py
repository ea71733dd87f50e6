"""The learned attacker of PrivateLoRA (Luo et al., AAAI 2025, App. E): an MLP on the error map.

Feature (``feature="map"``, the paper's): the flattened element-wise squared error
e = (ε̂_θ(x₀ + σε, σ, c) − ε)², at one σ drawn from the model's training distribution (DDPM's
t ~ U{0..T−1}) and one fresh ε. Classifier h_ω: Linear(D→512) → ReLU → Dropout(0.5) →
Linear(512→256) → ReLU → Dropout(0.5) → Linear(256→2), trained with cross-entropy (class 1 = member).

``feature="loss"`` (privdiff's variant, not in the paper): the same MLP on [log mean(e), onehot(t)]
at one t drawn from the loss attack's Goldilocks timesteps (:data:`~.scores.LOSS_TIMESTEPS`), one
fresh ε. Why: with a few dozen auxiliary images per class, the map MLP learns *which images* are in
member_aux (the map shows the digit's strokes) and does not generalise to other members. On
``runs/mia2/lora-mnist5k`` (plain LoRA, 64 + 64 auxiliary examples) h′ on maps scores AUC 0.55,
h′ on the loss feature 0.81 (64 members against 1,064 non-members, docs/benchmarks.md). A defense can only push against what its proxy sees.

The same :func:`proxy_features` serves the defenses (:mod:`privdiff.methods.lora`), where it must
stay inside the autograd graph of the trained parameters; here, as an evaluation attack h′, it is
trained from scratch on the auxiliary roles and scored on the held-out ones.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import PROXY_FEATURES
from ..diffusion import SigmaDistribution
from .scores import LOSS_TIMESTEPS, ddpm_sigma
from .target import Target

__all__ = ["ProxyAttacker", "error_map", "feature_dim", "member_gain", "proxy_features", "proxy_scores"]


class ProxyAttacker(nn.Module):
    """h_ω: MLP [512, 256, 2] with ReLU and dropout 0.5 on a flattened error map (logits, class 1 = member)."""

    def __init__(self, in_features: int, *, hidden: tuple[int, int] = (512, 256), dropout: float = 0.5):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden[0]), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden[0], hidden[1]), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden[1], 2),
        )

    def forward(self, e: Tensor) -> Tensor:
        return self.mlp(e.flatten(1))


def error_map(eps_fn: Callable[[Tensor, Tensor, Tensor | None], Tensor], x0: Tensor, cond: Tensor | None, *,
              sigma: Tensor, noise: Tensor) -> Tensor:
    """e = (ε̂(x₀ + σ·ε, σ, c) − ε)², element-wise, [B, C, H, W]; differentiable in ``eps_fn``'s parameters."""
    view = (-1,) + (1,) * (x0.ndim - 1)
    # x_σ = x₀ + σ·ε
    x = x0 + sigma.view(view) * noise
    return (eps_fn(x, sigma, cond) - noise).square()


def _check_kind(kind: str) -> None:
    if kind not in PROXY_FEATURES:
        raise ValueError(f"unknown proxy feature {kind!r} (available: {', '.join(PROXY_FEATURES)})")


def feature_dim(kind: str, shape: tuple[int, ...]) -> int:
    """Input width of h_ω for ``kind`` on examples of ``shape`` (C, H, W)."""
    _check_kind(kind)
    return int(np.prod(shape)) if kind == "map" else 1 + len(LOSS_TIMESTEPS)


def proxy_features(eps_fn: Callable[[Tensor, Tensor, Tensor | None], Tensor], x0: Tensor, cond: Tensor | None, *,
                   kind: str, sigma_dist: SigmaDistribution, generator: torch.Generator) -> Tensor:
    """h_ω's input [B, D] for each example: one fresh (σ, ε) each; differentiable in ``eps_fn``'s parameters.

    ``map``: e = (ε̂(x₀ + σε, σ, c) − ε)² flattened, σ ~ ``sigma_dist``. ``loss``: [log mean(e), onehot(t)]
    with t uniform over :data:`~.scores.LOSS_TIMESTEPS` and σ = σ_t of DDPM's schedule.
    """
    _check_kind(kind)
    B = len(x0)
    if kind == "map":
        sigma = sigma_dist((B,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        return error_map(eps_fn, x0, cond, sigma=sigma, noise=noise).flatten(1)
    table = torch.tensor([ddpm_sigma(t) for t in LOSS_TIMESTEPS], dtype=x0.dtype, device=x0.device)
    # t ~ U(LOSS_TIMESTEPS), ε ~ N(0, I)
    k = torch.randint(0, len(LOSS_TIMESTEPS), (B,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    # log ‖ε̂(x₀ + σ_t ε, σ_t) − ε‖² / dim, and which t it was measured at
    log_err = error_map(eps_fn, x0, cond, sigma=table[k], noise=noise).flatten(1).mean(1).log()
    return torch.cat([log_err[:, None], F.one_hot(k, len(LOSS_TIMESTEPS)).to(x0.dtype)], dim=1)


def member_gain(attacker: ProxyAttacker, e: Tensor, *, member: bool = True) -> Tensor:
    """Per-example MI gain term log h_ω(e) (member) or log(1 − h_ω(e)) (non-member), [B]; G ≤ 0 (PrivateLoRA eq. 5)."""
    return F.log_softmax(attacker(e), dim=1)[:, 1 if member else 0]


@torch.no_grad()
def _features(target: Target, x0: Tensor, cond: Tensor | None, sigma_dist: SigmaDistribution, draws: int,
              g: torch.Generator, kind: str) -> Tensor:
    """[draws, N, D] features, each draw with its own (σ, ε) per example."""
    out = []
    for _ in range(draws):
        rows = []
        for i in range(0, len(x0), target.batch_size):
            x, c = x0[i:i + target.batch_size], None if cond is None else cond[i:i + target.batch_size]
            rows.append(proxy_features(target.eps, x, c, kind=kind, sigma_dist=sigma_dist, generator=g))
        out.append(torch.cat(rows))
    return torch.stack(out)


def proxy_scores(target: Target, aux: tuple[Tensor, Tensor | None, Tensor, Tensor | None],
                 test: tuple[Tensor, Tensor | None, Tensor, Tensor | None], *, epochs: int = 100, draws: int = 8,
                 lr: float = 1e-4, weight_decay: float = 1e-4, batch_size: int = 64, seed: int = 0,
                 feature: str = "map", progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Train a fresh h′ on the auxiliary members / non-members and score the held-out ones.

    ``aux`` and ``test`` are ``(x_members, c_members, x_nonmembers, c_nonmembers)`` in model space;
    ``feature`` is :func:`proxy_features`' kind. Each example gets ``draws`` features (fresh (σ, ε) each); h′ trains ``epochs`` passes over the
    auxiliary maps (Adam, balanced classes; a fixed number of epochs, so nothing is selected on the
    test roles). A held-out example's score is its mean member logit-margin over its ``draws`` maps.
    """
    g = torch.Generator(device=target.device).manual_seed(seed)
    torch.manual_seed(seed)
    dist = target.sigma_distribution()
    fm = _features(target, aux[0], aux[1], dist, draws, g, feature)
    fn = _features(target, aux[2], aux[3], dist, draws, g, feature)
    X = torch.cat([fm.flatten(0, 1), fn.flatten(0, 1)])
    y = torch.cat([torch.ones(fm.shape[0] * fm.shape[1]), torch.zeros(fn.shape[0] * fn.shape[1])]).long().to(X.device)
    h = ProxyAttacker(X.shape[1]).to(X.device)
    opt = torch.optim.Adam(h.parameters(), lr=lr, weight_decay=weight_decay)
    threads = torch.get_num_threads()
    if X.device.type == "cpu":
        torch.set_num_threads(1)  # a small MLP gains nothing from threads, and on a busy CPU their spin-waits cost 30x
    try:
        for _ in tqdm(range(epochs), desc="proxy attacker", unit="epoch", disable=not progress, file=sys.stderr, leave=False):
            h.train()
            perm = torch.randperm(len(X), device=X.device)
            for i in range(0, len(X), batch_size):
                b = perm[i:i + batch_size]
                loss = F.cross_entropy(h(X[b]), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    h.eval()

    @torch.no_grad()
    def score(x: Tensor, c: Tensor | None) -> np.ndarray:
        f = _features(target, x, c, dist, draws, g, feature)  # [draws, N, D]
        logits = h(f.flatten(0, 1)).view(draws, len(x), 2)
        return (logits[..., 1] - logits[..., 0]).mean(0).double().cpu().numpy()

    return score(test[0], test[1]), score(test[2], test[3])
