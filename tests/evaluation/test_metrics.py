"""FID, KID and improved precision/recall against their definitions, on fresh random inputs."""

import itertools

import numpy as np
import pytest
import torch

from privdiff.data import load_dataset
from privdiff.evaluation.features import train_feature_cnn
from privdiff.evaluation.metrics import extract_features, fid, kid, precision_recall


def _gauss(n, d, seed, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift


def test_fid_matches_the_closed_form_and_is_zero_on_itself():
    real, fake = _gauss(3000, 8, 1), _gauss(3000, 8, 2, shift=0.3, scale=1.5)
    # the obvious reference: numpy/scipy Fréchet distance of the two fitted Gaussians
    from scipy import linalg

    mu1, mu2 = real.mean(0).numpy(), fake.mean(0).numpy()
    s1, s2 = np.cov(real.numpy(), rowvar=False), np.cov(fake.numpy(), rowvar=False)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert fid(real, fake) == pytest.approx(ref, rel=1e-6)
    assert fid(real, real) < 1e-6


@pytest.fixture(scope="module")
def digits_features():
    """A feature CNN trained on public digits (16 px) and the real test images it will look at."""
    net = train_feature_cnn(load_dataset("digits", split="train", resolution=16), public=True, epochs=4, progress=False)
    test = (load_dataset("digits", split="test", resolution=16).images + 1) / 2
    return net, test


def test_fid_grows_monotonically_with_noise_on_real_images(digits_features):
    net, images = digits_features
    real = extract_features(net.module, images)
    assert fid(real, extract_features(net.module, images)) < 1e-6  # a set against itself
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(images.shape, generator=g)
    scores = [
        fid(real, extract_features(net.module, (images + s * noise).clamp(0, 1))) for s in (0.05, 0.1, 0.2, 0.4, 0.8)
    ]
    assert all(a < b for a, b in zip(scores, scores[1:])), scores
    assert scores[0] > 0


def test_kid_is_the_unbiased_mmd_and_centred_on_zero_for_one_distribution():
    d = 6
    real, fake = _gauss(60, d, 3), _gauss(60, d, 4, shift=0.2)

    def k(a, b):  # the cubic polynomial kernel of KID
        return (a @ b.T / d + 1) ** 3

    def mmd2_unbiased(x, y):  # one term at a time, as written in Bińkowski et al. (2018), eq. 3
        m = len(x)
        kxx = sum(k(x[i : i + 1], x[j : j + 1]).item() for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
        kyy = sum(k(y[i : i + 1], y[j : j + 1]).item() for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
        kxy = k(x, y).sum().item() / (m * m)
        return kxx + kyy - 2 * kxy

    mean, std = kid(real, fake, subset_size=60, subsets=1)  # one subset = the whole sets
    assert mean == pytest.approx(mmd2_unbiased(real, fake), rel=1e-6)
    assert std == 0 or np.isnan(std) or std >= 0
    # unbiased: over many independent pairs from one distribution the estimate averages to ~0,
    # where the biased (V-statistic) estimate is always positive
    estimates = [
        kid(_gauss(100, d, 100 + i), _gauss(100, d, 200 + i), subset_size=100, subsets=1)[0] for i in range(60)
    ]
    se = np.std(estimates) / np.sqrt(len(estimates))
    assert abs(np.mean(estimates)) < 3 * se
    assert min(estimates) < 0 < max(estimates)


def _pr_reference(real, fake, k):
    """Improved precision/recall by brute force, one point at a time."""

    def radii(x):
        return [sorted(float(torch.dist(a, b)) for b in x)[k] for a in x]  # [0] is the point itself

    def inside(points, centres, r):
        return np.mean([any(float(torch.dist(p, c)) <= rc for c, rc in zip(centres, r)) for p in points])

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_equal_the_brute_force_definition(k):
    real, fake = _gauss(70, 3, 5), _gauss(60, 3, 6, shift=0.5, scale=0.8)
    assert precision_recall(real, fake, k=k) == pytest.approx(_pr_reference(real, fake, k), abs=1e-12)


def test_precision_recall_on_toy_manifolds():
    real = _gauss(1500, 4, 8)
    same = precision_recall(real, _gauss(1500, 4, 9), k=3)
    assert same[0] > 0.7 and same[1] > 0.7  # same distribution: both high
    collapsed = precision_recall(real, _gauss(1500, 4, 10, scale=0.1), k=3)  # mode collapse onto the centre
    assert collapsed[0] > 0.99 and collapsed[1] < 0.2  # realistic, but no variety
    spread = precision_recall(real, _gauss(1500, 4, 11, scale=3.0), k=3)  # covers everything, mostly off-manifold
    assert spread[0] < 0.4 and spread[1] > 0.9
    far = precision_recall(real, _gauss(1500, 4, 12, shift=20.0), k=3)
    assert far == (0.0, 0.0)


def test_bad_feature_sets_are_refused():
    with pytest.raises(ValueError, match="same d"):
        fid(_gauss(10, 3, 1), _gauss(10, 4, 2))
    with pytest.raises(ValueError, match="at least"):
        precision_recall(_gauss(3, 3, 1), _gauss(10, 3, 2), k=3)
    bad = _gauss(10, 3, 1)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fid(bad, _gauss(10, 3, 2))
