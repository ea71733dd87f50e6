"""DPP's central-image release: its sensitivity bound, and its composition with DP-SGD in one budget."""

from __future__ import annotations

import math

import pytest
import torch

from privdiff.privacy.accounting import calibrate_noise, epsilon
from privdiff.privacy.central import central_sensitivity, class_means, release_central_images
from privdiff.privacy.ledger import SUBSAMPLED_GAUSSIAN, Ledger, Release
from tests.helpers import DELTA, dp_accounting_rdp


@pytest.mark.parametrize("downsample", [1, 2, 4])
def test_adding_or_removing_one_example_never_moves_the_query_more_than_the_bound(downsample):
    """Neighbours D' = D + (x, y) under every sampling outcome that includes x: ‖μ̂(D') − μ̂(D)‖₂ ≤ Δ,
    with equality for an all-ones image (the bound is tight), for random images of every class."""
    g = torch.Generator().manual_seed(0)
    N, K, C, H = 200, 5, 3, 8
    images, labels = torch.rand(N, C, H, H, generator=g), torch.randint(0, K, (N,), generator=g)
    m = math.floor(0.3 * N / K)
    bound = central_sensitivity(channels=C, height=H // downsample, width=H // downsample, expected_per_class=m)
    worst = 0.0
    for trial in range(30):
        x = torch.ones(1, C, H, H) if trial == 0 else torch.rand(1, C, H, H, generator=g)
        y = torch.randint(0, K, (1,), generator=g)
        mask = torch.rand(N, generator=g) < 0.3
        before = class_means(images, labels, mask, num_classes=K, expected_per_class=m, downsample=downsample)
        after = class_means(
            torch.cat([images, x]),
            torch.cat([labels, y]),
            torch.cat([mask, torch.tensor([True])]),
            num_classes=K,
            expected_per_class=m,
            downsample=downsample,
        )
        change = float((after - before).norm())
        assert change <= bound * (1 + 1e-6)
        worst = max(worst, change)
        # the other classes are untouched: one query per round for all classes
        others = [c for c in range(K) if c != int(y)]
        assert torch.equal(after[others], before[others])
    assert worst == pytest.approx(bound, rel=1e-6)


def test_release_shapes_range_and_determinism():
    g = torch.Generator().manual_seed(1)
    images, labels = torch.rand(400, 1, 8, 8, generator=g), torch.randint(0, 10, (400,), generator=g)
    kw = dict(num_classes=10, sample_rate=0.5, noise_multiplier=5.0, rounds=3, downsample=2)
    a = release_central_images(images, labels, generator=torch.Generator().manual_seed(2), **kw)
    b = release_central_images(images, labels, generator=torch.Generator().manual_seed(2), **kw)
    assert a.images.shape == (30, 1, 4, 4) and a.labels.tolist() == list(range(10)) * 3
    assert 0 <= float(a.images.min()) and float(a.images.max()) <= 1 and torch.equal(a.images, b.images)
    assert a.expected_per_class == 20 and a.sensitivity == pytest.approx(4 / 20)
    with pytest.raises(ValueError, match="noise_multiplier"):
        release_central_images(images, labels, generator=g, **{**kw, "noise_multiplier": 0.0})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        release_central_images(images * 2 - 1, labels, generator=g, **kw)


def test_release_and_dp_sgd_compose_to_the_target():
    """The release is recorded as its own event; DP-SGD's σ is calibrated so that BOTH meet the target (within 0.5 %),
    and the ledger's ε equals dp-accounting's RDP composition of the two events."""
    ledger = Ledger(delta=DELTA, accountant="rdp", dataset={"name": "x", "fingerprint": "sha256:0"})
    ledger.record(
        Release(
            stage="central_images",
            mechanism=SUBSAMPLED_GAUSSIAN,
            noise_multiplier=5.0,
            sample_rate=0.1,
            steps=5,
            sensitivity=0.35,
        )
    )
    for target in (1.0, 10.0):
        q, steps = 250 / 4000, 880
        sigma = calibrate_noise(
            epsilon_target=target,
            delta=DELTA,
            sample_rate=q,
            steps=steps,
            accountant="rdp",
            prior=ledger.history(exclude_stage="dp_sgd"),
        )
        total = ledger.epsilon(extra=[(sigma, q, steps)])
        assert target * 0.995 <= total <= target * (1 + 1e-9)
        assert total == pytest.approx(dp_accounting_rdp([(5.0, 0.1, 5), (sigma, q, steps)]), rel=1e-3)
        # the release costs something: without it the same σ would spend less
        assert epsilon([(sigma, q, steps)], delta=DELTA) < total


def test_replacing_one_example_moves_the_query_at_most_sqrt2_bound_and_within_a_class_at_most_the_bound():
    """Replace-one neighbours (not the ledger's add/remove relation, but what a reader may check first):
    replacing (x, y) by (x', y') under the same sampling outcome moves the release by ≤ Δ when y = y'
    and by ≤ √2·Δ otherwise (two class sums, disjoint coordinates); the extremes are reached."""
    g = torch.Generator().manual_seed(3)
    N, K, C, H, ds = 150, 4, 1, 8, 2
    images, labels = torch.rand(N, C, H, H, generator=g), torch.randint(0, K, (N,), generator=g)
    m = math.floor(0.4 * N / K)
    bound = central_sensitivity(channels=C, height=H // ds, width=H // ds, expected_per_class=m)
    worst_same = worst_other = 0.0
    for trial in range(40):
        i = int(torch.randint(0, N, (1,), generator=g))
        mask = torch.rand(N, generator=g) < 0.4
        mask[i] = True  # the replaced example is in the batch (otherwise nothing moves)
        new_x = torch.rand(1, C, H, H, generator=g)
        same = trial % 2 == 0
        new_y = labels[i] if same else (labels[i] + 1 + torch.randint(0, K - 1, (1,), generator=g)) % K
        if trial < 2:  # extremes: all-ones replaced by all-zeros (same class), or both all-ones (other class)
            images[i] = 1.0
            new_x = torch.zeros_like(new_x) if same else torch.ones_like(new_x)
        x2, y2 = images.clone(), labels.clone()
        x2[i], y2[i] = new_x[0], new_y
        before = class_means(images, labels, mask, num_classes=K, expected_per_class=m, downsample=ds)
        after = class_means(x2, y2, mask, num_classes=K, expected_per_class=m, downsample=ds)
        change = float((after - before).norm())
        if same:
            assert change <= bound * (1 + 1e-6)
            worst_same = max(worst_same, change)
        else:
            assert change <= math.sqrt(2) * bound * (1 + 1e-6)
            worst_other = max(worst_other, change)
    assert worst_same == pytest.approx(bound, rel=1e-6)
    assert worst_other == pytest.approx(math.sqrt(2) * bound, rel=1e-6)
