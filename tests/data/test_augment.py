"""DPP's augmentation bag: shape, range, determinism under a seed, and that it does change images."""

import pytest
import torch

from privdiff.data.augment import NUM_OPS, _op, augment_copies, median_blur, sharpen


def test_copies_keep_shape_and_range_and_repeat_under_a_seed():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 3, 16, 16, generator=g), torch.arange(6)
    a, la = augment_copies(x, y, copies=4, generator=torch.Generator().manual_seed(1))
    b, lb = augment_copies(x, y, copies=4, generator=torch.Generator().manual_seed(1))
    c, _ = augment_copies(x, y, copies=4, generator=torch.Generator().manual_seed(2))
    assert a.shape == (24, 3, 16, 16) and la.tolist() == list(range(6)) * 4
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)


@pytest.mark.parametrize("op", range(NUM_OPS))
def test_every_operation_keeps_range_and_changes_the_image(op):
    g = torch.Generator().manual_seed(op)
    x = torch.rand(4, 1, 12, 12, generator=g)
    out = _op(x, op, torch.full((4,), 0.9), torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert out.shape == x.shape and 0 <= float(out.min()) and float(out.max()) <= 1 + 1e-6
    assert (out - x).abs().max() > 1e-3


def test_median_blur_removes_salt_and_sharpen_keeps_constants():
    x = torch.zeros(1, 1, 7, 7)
    x[0, 0, 3, 3] = 1.0  # an isolated bright pixel
    assert float(median_blur(x).max()) == 0.0
    flat = torch.full((1, 2, 5, 5), 0.4)
    torch.testing.assert_close(sharpen(flat), flat)
