"""Feature networks for FID/KID/precision/recall, and an on-disk cache keyed by content hash.

The default feature network is privdiff's :class:`~privdiff.evaluation.classifiers.SmallCNN`
trained on a *public* data set (``evaluate.public_data``), or, where the recipe says
``evaluate.features=train``, on the real training split (recorded as such: that network is a
non-private function of the private data). Numbers computed on it are named ``privdiff-cnn`` in
``metrics.json`` and are never comparable with Inception-FID; ``--inception-weights`` selects
the standard FID Inception network from a local file instead.

For data with no matching public set (colour images: privdiff's public sets are grayscale),
:func:`photo_feature_cnn` builds the same network for any number of channels and resolution
from public photographs that installed packages ship (scikit-learn's sample images and
matplotlib's), trained on a self-supervised task: it is public by construction and offline.

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

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_write_text
from ..runtime import cache_dir
from ..data import ImageDataset, content_fingerprint
from .classifiers import Embedding, SmallCNN, fit_classifier

FEATURE_CNN_VERSION = 2  # bump when the architecture, its training or its output scaling changes
PHOTO_PATCHES_VERSION = 1  # bump when the crops of the public photos or their pretext labels change
PHOTO_ROTATIONS = 4  # pretext classes per photo: rotated by 0, 90, 180, 270 degrees


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


def is_cached(kind: str, key: str, *, tensors: bool = False) -> bool:
    """Whether :func:`cached_json` (or, with ``tensors``, :func:`cached_tensors`) holds ``kind/key``."""
    return (cache_dir() / kind / f"{key}.{'safetensors' if tensors else 'json'}").is_file()


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
    settings = dict(
        version=FEATURE_CNN_VERSION,
        data=data.fingerprint,
        resolution=data.resolution,
        channels=data.channels,
        epochs=epochs,
        lr=lr,
        seed=seed,
    )
    key = content_key(**settings)

    def make() -> dict[str, torch.Tensor]:
        images = (data.images + 1) / 2
        fit = fit_classifier(
            "cnn",
            images,
            data.labels,
            num_classes=data.num_classes,
            epochs=epochs,
            lr=lr,
            seed=seed,
            progress=progress,
            desc=f"feature CNN on {data.name}/{data.split}",
        )
        with torch.no_grad():  # RMS of the features on the network's own training data
            rms = (
                torch.cat([fit.model.eval().embed(images[i : i + 500]) for i in range(0, len(images), 500)])
                .square()
                .mean()
                .sqrt()
            )
        return {**fit.model.state_dict(), "held_out_accuracy": torch.tensor(fit.val_accuracy), "feature_scale": rms}

    state = cached_tensors("feature-cnn", key, make)
    held_out, scale = float(state.pop("held_out_accuracy")), float(state.pop("feature_scale"))
    cnn = SmallCNN(in_channels=data.channels, num_classes=data.num_classes, resolution=data.resolution)
    cnn.load_state_dict(state)
    trained_on = (
        f"{data.name}/{data.split} (public)"
        if public
        else f"{data.name}/{data.split} (the private training split; the feature network is not covered by epsilon)"
    )
    return FeatureNetwork(
        Embedding(cnn, scale=scale),
        {
            "name": "privdiff-cnn",
            "trained_on": trained_on,
            "dim": SmallCNN.num_features,
            "feature_scale": round(scale, 6),
            "held_out_accuracy": round(held_out, 4),
            "sha256": "sha256:" + key,
            "note": "FID/KID on these features are not Inception-FID and not comparable with published numbers",
        },
    )


def inception_network(path: str | Path) -> FeatureNetwork:
    """The standard FID Inception-v3 from a local weights file (see :mod:`.inception`)."""
    from .inception import load_fid_inception, weights_sha256

    model = load_fid_inception(path)
    return FeatureNetwork(
        model,
        {
            "name": "inception-v3-compat",
            "weights": str(path),
            "dim": model.num_features,
            "sha256": weights_sha256(path),
            "note": "pool3 features of the FID Inception (torch-fidelity layout, TF1 resize)",
        },
    )


def cached_features(
    net: FeatureNetwork, data: ImageDataset, *, limit: int | None = None, seed: int = 0, progress: bool = True
) -> torch.Tensor:
    """Features of a real data set (or of a seeded random ``limit`` of its images) under ``net``, cached by content."""
    from .metrics import extract_features

    images = (data.images + 1) / 2
    if limit is not None and limit < len(images):
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:limit]]
    key = content_key(network=net.key, data=data.fingerprint, resolution=data.resolution, limit=limit, seed=seed)
    return cached_tensors(
        "features",
        key,
        lambda: {
            "features": extract_features(
                net.module, images, progress=progress, desc=f"features of {data.name}/{data.split}"
            )
        },
    )["features"]


def public_photos() -> list[tuple[str, np.ndarray]]:
    """The public colour photographs that installed packages ship, as ``(name, uint8 [H, W, 3])``.

    scikit-learn's ``load_sample_images()`` (``china.jpg``, ``flower.jpg``, both 427×640) and,
    where the installed matplotlib ships it, its ``sample_data/grace_hopper.jpg``. Nothing is
    downloaded; the list is in a fixed order.
    """
    import matplotlib
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    photos = [(Path(f).name, np.asarray(im, dtype=np.uint8)) for f, im in zip(bunch.filenames, bunch.images)]
    extra = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if extra.is_file():
        with Image.open(extra) as im:
            photos.append((extra.name, np.asarray(im.convert("RGB"), dtype=np.uint8)))
    return photos


def check_photo_options(*, channels: int, resolution: int, n: int) -> None:
    """One-line errors for a network the photos cannot give."""
    if channels not in (1, 3):
        raise ValueError(f"the public-photo feature network is built for 1 or 3 channels, got {channels!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise ValueError(
            f"the public-photo feature network needs a resolution of at least 8 pixels, got {resolution!r}"
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 2 * PHOTO_ROTATIONS:
        raise ValueError(f"the public-photo feature network needs at least {2 * PHOTO_ROTATIONS} patches, got {n!r}")


def photo_patches(*, channels: int, resolution: int, n: int = 6000, seed: int = 0) -> ImageDataset:
    """A self-supervised, public training set for a feature network: rotated crops of :func:`public_photos`.

    Each of the ``n`` examples is a square crop of one photo (photo, position and a side
    between ``resolution`` and the photo's short side, log-uniform, drawn from ``seed``),
    resized with PIL (bilinear, antialiased) to ``resolution``, converted to grayscale for
    ``channels=1``, and rotated by ``k`` × 90°. Its label ``photo * 4 + k`` (which photo,
    which rotation) needs no annotation: a network that predicts it must see colour, texture
    and orientation, which is what FID's features should measure. The patches are cached by
    the photos' content and these settings.

    Args:
        channels: 1 (grayscale) or 3 (RGB).
        resolution: Side length of the patches, >= 8.
        n: Number of patches.
        seed: Seed of the crops and rotations.

    Returns:
        An :class:`ImageDataset` named ``"public-photos"`` (split ``"train"``) with one class per
        (photo, rotation) and a fingerprint of the patches.
    """
    check_photo_options(channels=channels, resolution=resolution, n=n)
    photos = public_photos()
    names = tuple(f"{name} rot{90 * k}" for name, _ in photos for k in range(PHOTO_ROTATIONS))
    source = hashlib.sha256()
    for name, pixels in photos:
        source.update(name.encode() + str(pixels.shape).encode() + pixels.tobytes())
    key = content_key(
        version=PHOTO_PATCHES_VERSION,
        photos=source.hexdigest(),
        channels=channels,
        resolution=resolution,
        n=n,
        seed=seed,
    )

    def make() -> dict[str, torch.Tensor]:
        rng = np.random.default_rng(seed)
        images = np.empty((n, channels, resolution, resolution), dtype=np.uint8)
        labels = np.empty(n, dtype=np.int64)
        pil = [Image.fromarray(pixels).convert("L" if channels == 1 else "RGB") for _, pixels in photos]
        for i in range(n):
            p, k = int(rng.integers(len(photos))), int(rng.integers(PHOTO_ROTATIONS))
            w, h = pil[p].size
            short = min(w, h)
            side = int(round(float(np.exp(rng.uniform(np.log(min(resolution, short)), np.log(short))))))
            x, y = int(rng.integers(w - side + 1)), int(rng.integers(h - side + 1))
            crop = pil[p].resize((resolution, resolution), Image.Resampling.BILINEAR, box=(x, y, x + side, y + side))
            array = np.asarray(crop, dtype=np.uint8)
            array = array[None] if channels == 1 else array.transpose(2, 0, 1)
            images[i] = np.rot90(array, k, axes=(1, 2))
            labels[i] = p * PHOTO_ROTATIONS + k
        return {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels)}

    cached = cached_tensors("public-photos", key, make)
    images, labels = cached["images"].numpy(), cached["labels"].numpy()
    return ImageDataset(
        images=torch.from_numpy(images.astype(np.float32)) / 127.5 - 1.0,
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_classes=len(names),
        name="public-photos",
        split="train",
        fingerprint=content_fingerprint(images, labels, name="public-photos", split="train"),
        class_names=names,
    )


def photo_feature_cnn(
    *,
    channels: int,
    resolution: int,
    n: int = 6000,
    epochs: int = 10,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> FeatureNetwork:
    """privdiff's feature CNN for ``channels`` × ``resolution``² images, public by construction and offline.

    A :class:`SmallCNN` trained by :func:`train_feature_cnn` on :func:`photo_patches` (crops of
    photographs that scikit-learn and matplotlib ship, labelled only by which photo and which
    rotation): no private or downloaded image is involved, so it serves any data set, colour
    ones included, that has no matching public set. Cached like every feature CNN (by the
    patches' fingerprint and the training settings). Recorded as ``privdiff-cnn`` with
    ``trained_on`` naming the photos; its FID/KID are not Inception-FID.

    Args:
        channels: 1 or 3, the channels of the data it will measure.
        resolution: Side length of the data it will measure, >= 8.
        n: Number of training patches.
        epochs: Training epochs (the best epoch on 10% held-out patches is kept).
        lr: Adam learning rate.
        seed: Seed of the patches and of the training.
        progress: Show a progress bar while training.
    """
    data = photo_patches(channels=channels, resolution=resolution, n=n, seed=seed)
    net = train_feature_cnn(data, public=True, epochs=epochs, lr=lr, seed=seed, progress=progress)
    photos = ", ".join(sorted({name.rsplit(" ", 1)[0] for name in data.class_names or ()}))
    net.info["trained_on"] = (
        f"public-photos: {n} {resolution}x{resolution} crops of {photos} (photographs shipped "
        "by scikit-learn and matplotlib; public), self-supervised: which photo and which rotation"
    )
    return net
