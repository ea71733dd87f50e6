"""Sample-quality metrics on a feature space: FID, KID (torchmetrics), improved precision/recall.

Features are extracted once per image set (:func:`extract_features`, any extractor module that
maps ``[N, C, H, W]`` in [0, 1] to ``[N, d]``) and the metrics are computed from them, so a slow
extractor (Inception at 299 px) runs once per image, not once per metric. FID and KID are
torchmetrics' own implementations, fed the precomputed features through an identity "feature
network" (:class:`Precomputed`).
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm


@torch.no_grad()
def extract_features(
    extractor: nn.Module,
    images: Tensor | np.ndarray,
    *,
    batch_size: int = 250,
    progress: bool = False,
    desc: str = "features",
) -> Tensor:
    """``extractor`` applied to float images in [0, 1], batch by batch; returns float64 ``[N, d]``."""
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(x.shape)}")
    extractor.eval()
    device = next(extractor.parameters(), torch.empty(0)).device
    out = [
        extractor(x[i : i + batch_size].to(device)).double().cpu()
        for i in tqdm(range(0, len(x), batch_size), desc=desc, unit="batch", disable=not progress, file=sys.stderr)
    ]
    return torch.cat(out)


class Precomputed(nn.Module):
    """The identity on ``[N, d]`` features: lets torchmetrics' metrics consume features extracted once."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected features [N, {self.num_features}], got {tuple(features.shape)}")
        return features


def fid(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance ‖μ_r − μ_f‖² + Tr(Σ_r + Σ_f − 2(Σ_r Σ_f)^½) between two feature sets (torchmetrics)."""
    _check_pair(real, fake, minimum=2)
    metric = FrechetInceptionDistance(feature=Precomputed(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return max(0.0, float(metric.compute()))


def kid(
    real: Tensor, fake: Tensor, *, subset_size: int = 1000, subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
    """Kernel distance: unbiased MMD² with the cubic polynomial kernel, mean and std over random subsets (torchmetrics).

    ``subset_size`` is capped at the smaller set's size. Deterministic under ``seed``.
    """
    _check_pair(real, fake, minimum=2)
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # "will save all extracted features": they are already in memory
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=Precomputed(real.shape[1]), subset_size=size, subsets=subsets)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws the subsets from the global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _kth_neighbour_radii(x: Tensor, k: int, *, chunk: int = 2048) -> Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row."""
    radii = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i : i + chunk], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the 1st is the point itself (distance 0)
    return torch.cat(radii)


def _covered(points: Tensor, centres: Tensor, radii: Tensor, *, chunk: int = 2048) -> Tensor:
    """Whether each point lies in at least one ball B(centre, radius)."""
    hit = []
    for i in range(0, len(points), chunk):
        d = torch.cdist(points[i : i + chunk], centres)
        hit.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(hit)


def precision_recall(real: Tensor, fake: Tensor, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each set's manifold is the union of balls around its points with radius the distance to the
    k-th nearest neighbour in the same set. Precision: fraction of fake points inside the real
    manifold (are samples realistic?). Recall: fraction of real points inside the fake manifold
    (is the data's variety covered?).
    """
    _check_pair(real, fake, minimum=k + 1)
    real, fake = real.double(), fake.double()
    precision = _covered(fake, real, _kth_neighbour_radii(real, k)).double().mean()
    recall = _covered(real, fake, _kth_neighbour_radii(fake, k)).double().mean()
    return float(precision), float(recall)


def image_metrics(
    real: Tensor, fake: Tensor, *, kid_subset_size: int = 1000, kid_subsets: int = 100, pr_k: int = 3, seed: int = 0
) -> dict[str, dict[str, float]]:
    """FID, KID (± std), precision and recall of ``fake`` against ``real`` features."""
    kid_mean, kid_std = kid(real, fake, subset_size=kid_subset_size, subsets=kid_subsets, seed=seed)
    precision, recall = precision_recall(real, fake, k=pr_k)
    return {
        "fid": {"value": fid(real, fake)},
        "kid": {"value": kid_mean, "std": kid_std},
        "precision": {"value": precision},
        "recall": {"value": recall},
    }


def _check_pair(real: Tensor, fake: Tensor, *, minimum: int) -> None:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"feature sets must be [N, d] with the same d, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    if min(len(real), len(fake)) < minimum:
        raise ValueError(f"need at least {minimum} feature vectors per set, got {len(real)} real and {len(fake)} fake")
    if not (torch.isfinite(real).all() and torch.isfinite(fake).all()):
        raise ValueError("features contain NaN or inf")
