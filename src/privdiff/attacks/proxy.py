"""The learned attack h′ of PrivateLoRA (Luo et al., AAAI 2025, App. E): a fresh proxy attacker
(:class:`~privdiff.core.proxy.ProxyAttacker`, the MLP of the defence) trained on the auxiliary
members / non-members' features and scored on the held-out ones. See :mod:`privdiff.core.proxy`
for the features (``map``, the paper's, and ``loss``) and why both exist."""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..core.proxy import ProxyAttacker, proxy_features
from ..diffusion import SigmaDistribution
from .target import Target

__all__ = ["proxy_scores"]


@torch.no_grad()
def _features(
    target: Target,
    x0: Tensor,
    cond: Tensor | None,
    sigma_dist: SigmaDistribution,
    draws: int,
    g: torch.Generator,
    kind: str,
) -> Tensor:
    """[draws, N, D] features, each draw with its own (σ, ε) per example."""
    out = []
    for _ in range(draws):
        rows = []
        for i in range(0, len(x0), target.batch_size):
            x, c = x0[i : i + target.batch_size], None if cond is None else cond[i : i + target.batch_size]
            rows.append(
                proxy_features(target.eps, x, c, kind=kind, sigma_dist=sigma_dist, generator=g, sigmas=target.sigmas)
            )
        out.append(torch.cat(rows))
    return torch.stack(out)


def proxy_scores(
    target: Target,
    aux: tuple[Tensor, Tensor | None, Tensor, Tensor | None],
    test: tuple[Tensor, Tensor | None, Tensor, Tensor | None],
    *,
    epochs: int = 100,
    draws: int = 8,
    lr: float = 1e-4,
    weight_decay: float = 1e-4,
    batch_size: int = 64,
    seed: int = 0,
    feature: str = "map",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
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
        for _ in tqdm(
            range(epochs), desc="proxy attacker", unit="epoch", disable=not progress, file=sys.stderr, leave=False
        ):
            h.train()
            perm = torch.randperm(len(X), device=X.device)
            for i in range(0, len(X), batch_size):
                b = perm[i : i + batch_size]
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
