"""The public-photo feature network (any channels, any resolution), on tiny sizes."""

from __future__ import annotations

import pytest
import torch

from privdiff.evaluation import features
from privdiff.evaluation.features import photo_feature_cnn, photo_patches

TINY = dict(resolution=8, n=48, epochs=1, progress=False)


def _features(net: features.FeatureNetwork, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.module(x)


def test_colour_network_builds_deterministically_and_is_cached(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    seed = int(torch.randint(0, 1000, (), generator=g))
    images = torch.rand(5, 3, 8, 8, generator=g)  # fresh random colour images in [0, 1]
    monkeypatch.setenv("PRIVDIFF_CACHE", str(tmp_path / "a"))
    net = photo_feature_cnn(channels=3, seed=seed, **TINY)
    out = _features(net, images)
    assert out.shape == (5, net.info["dim"]) == (5, 128) and torch.isfinite(out).all()
    assert net.info["name"] == "privdiff-cnn" and "not Inception" in net.info["note"]
    assert net.info["trained_on"].startswith("public-photos") and "china.jpg" in net.info["trained_on"]

    monkeypatch.setattr(features, "fit_classifier", lambda *a, **k: pytest.fail("retrained a cached network"))
    cached = photo_feature_cnn(channels=3, seed=seed, **TINY)
    assert cached.key == net.key and torch.equal(_features(cached, images), out)
    monkeypatch.undo()

    monkeypatch.setenv("PRIVDIFF_CACHE", str(tmp_path / "b"))  # rebuilt from nothing: the same network
    again = photo_feature_cnn(channels=3, seed=seed, **TINY)
    assert again.key == net.key and torch.equal(_features(again, images), out)
    assert photo_feature_cnn(channels=3, seed=seed + 1, **TINY).key != net.key


def test_patches_are_public_photo_crops_labelled_by_photo_and_rotation(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVDIFF_CACHE", str(tmp_path))
    seed = int(torch.randint(0, 1000, ()))
    colour = photo_patches(channels=3, resolution=12, n=40, seed=seed)
    gray = photo_patches(channels=1, resolution=12, n=40, seed=seed)
    assert colour.images.shape == (40, 3, 12, 12) and gray.images.shape == (40, 1, 12, 12)
    assert colour.num_classes == len(colour.class_names) >= 8 and colour.class_names[1] == "china.jpg rot90"
    assert torch.equal(colour.labels, gray.labels)  # same crops, same pretext labels
    assert colour.fingerprint != gray.fingerprint
    assert colour.images.min() >= -1 and colour.images.max() <= 1 and colour.images.std() > 0.05
    assert photo_patches(channels=3, resolution=12, n=40, seed=seed).fingerprint == colour.fingerprint
    assert photo_patches(channels=3, resolution=12, n=40, seed=seed + 1).fingerprint != colour.fingerprint


@pytest.mark.parametrize("bad", [dict(channels=2), dict(channels=3, resolution=4), dict(channels=3, n=3)])
def test_refuses_what_the_photos_cannot_give(bad):
    with pytest.raises(ValueError, match="public-photo feature network"):
        photo_patches(**{"resolution": 8, "n": 48, **bad})
