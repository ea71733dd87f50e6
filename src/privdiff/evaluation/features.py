"""Feature networks for FID/KID/precision/recall, and an on-disk cache keyed by content hash.

The default feature network is privdiff's :class:`~privdiff.evaluation.classifiers.SmallCNN`
trained on a *public* data set (``evaluate.public_data``), or, where the recipe says
``evaluate.features=train``, on the real training split (recorded as such: that network is a
non-private function of the private data). Numbers computed on it are named ``privdiff-cnn`` in
``metrics.json`` and are never comparable with Inception-FID; ``--inception-weights`` selects
the standard FID Inception network from a local file instead.

Everything cached (trained extractors, real-data features, real-data classifier scores) lives
under ``$PRIVDIFF_CACHE`` (default ``~/.cache/privdiff``), named by the sha256 of everything that
determines it, so a changed data set, extractor or setting can never hit a stale entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_write_text
from ..data import ImageDataset
from .classifiers import Embedding, SmallCNN, fit_classifier

FEATURE_CNN_VERSION = 2  # bump when the architecture, its training or its output scaling changes


def cache_dir() -> Path:
    """Where privdiff keeps derived, re-creatable files: ``$PRIVDIFF_CACHE`` or ``~/.cache/privdiff``."""
    return Path(os.environ.get("PRIVDIFF_CACHE") or Path.home() / ".cache" / "privdiff")


def content_key(**parts: Any) -> str:
    """sha256 of a JSON description: the cache key of whatever those parts determine."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cached_tensors(kind: str, key: str, make) -> dict[str, torch.Tensor]:
    """``make()`` (a dict of tensors), stored as ``cache/kind/key.safetensors`` and reused after."""
    path = cache_dir() / kind / f"{key}.safetensors"
    if path.is_file():
        try:
            return load_file(path)
        except Exception:  # a damaged cache entry is recomputed, never trusted
            path.unlink(missing_ok=True)
    tensors = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)
    return tensors


def is_cached(kind: str, key: str) -> bool:
    """Whether :func:`cached_json` holds ``kind/key``."""
    return (cache_dir() / kind / f"{key}.json").is_file()


def cached_json(kind: str, key: str, make) -> dict[str, Any]:
    """``make()`` (a JSON-able dict), stored as ``cache/kind/key.json`` and reused after."""
    path = cache_dir() / kind / f"{key}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            path.unlink(missing_ok=True)
    value = make()
    atomic_write_text(path, json.dumps(value, indent=2))
    return value


@dataclass
class FeatureNetwork:
    """A feature extractor and the description ``metrics.json`` records with every number made on it."""

    module: nn.Module
    info: dict[str, Any]  # name, trained_on / weights, dim, sha256

    @property
    def key(self) -> str:
        return self.info["sha256"]


def train_feature_cnn(
    data: ImageDataset,
    *,
    public: bool,
    epochs: int = 30,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> FeatureNetwork:
    """:class:`SmallCNN` trained to classify ``data`` (epoch picked on 10% of it), as a 128-d feature network.

    Cached by the content of ``data`` and the training settings.
    """
    settings = dict(version=FEATURE_CNN_VERSION, data=data.fingerprint, resolution=data.resolution,
                    channels=data.channels, epochs=epochs, lr=lr, seed=seed)
    key = content_key(**settings)
    def make() -> dict[str, torch.Tensor]:
        images = (data.images + 1) / 2
        fit = fit_classifier("cnn", images, data.labels, num_classes=data.num_classes, epochs=epochs, lr=lr,
                             seed=seed, progress=progress, desc=f"feature CNN on {data.name}/{data.split}")
        with torch.no_grad():  # RMS of the features on the network's own training data
            rms = torch.cat([fit.model.eval().embed(images[i:i + 500]) for i in range(0, len(images), 500)]).square().mean().sqrt()
        return {**fit.model.state_dict(), "held_out_accuracy": torch.tensor(fit.val_accuracy), "feature_scale": rms}

    state = cached_tensors("feature-cnn", key, make)
    held_out, scale = float(state.pop("held_out_accuracy")), float(state.pop("feature_scale"))
    cnn = SmallCNN(in_channels=data.channels, num_classes=data.num_classes, resolution=data.resolution)
    cnn.load_state_dict(state)
    trained_on = f"{data.name}/{data.split} (public)" if public else \
        f"{data.name}/{data.split} (the private training split; the feature network is not covered by epsilon)"
    return FeatureNetwork(Embedding(cnn, scale=scale), {
        "name": "privdiff-cnn", "trained_on": trained_on, "dim": SmallCNN.num_features, "feature_scale": round(scale, 6),
        "held_out_accuracy": round(held_out, 4), "sha256": "sha256:" + key,
        "note": "FID/KID on these features are not Inception-FID and not comparable with published numbers",
    })


def inception_network(path: str | Path) -> FeatureNetwork:
    """The standard FID Inception-v3 from a local weights file (see :mod:`.inception`)."""
    from .inception import load_fid_inception, weights_sha256

    model = load_fid_inception(path)
    return FeatureNetwork(model, {
        "name": "inception-v3-compat", "weights": str(path), "dim": model.num_features,
        "sha256": weights_sha256(path), "note": "pool3 features of the FID Inception (torch-fidelity layout, TF1 resize)",
    })


def cached_features(net: FeatureNetwork, data: ImageDataset, *, limit: int | None = None, seed: int = 0, progress: bool = True) -> torch.Tensor:
    """Features of a real data set (or of a seeded random ``limit`` of its images) under ``net``, cached by content."""
    from .metrics import extract_features

    images = (data.images + 1) / 2
    if limit is not None and limit < len(images):
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:limit]]
    key = content_key(network=net.key, data=data.fingerprint, resolution=data.resolution, limit=limit, seed=seed)
    return cached_tensors("features", key, lambda: {"features": extract_features(
        net.module, images, progress=progress, desc=f"features of {data.name}/{data.split}")})["features"]
