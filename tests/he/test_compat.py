"""Compat mode (HE-Diffusion as published): HILL cost against scipy, the encrypted fraction the
reference note measured, and the encrypted update + merge against the plaintext DDIM update.
CKKS: "precise" (N = 8192, Δ = 2^40), tolerance 1e-5 on N(0, 1) latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("tenseal")

from privdiff.he.ckks import PRESETS, TenSEALContext  # noqa: E402
from privdiff.he.compat import (
    coo_pack,
    encrypt_packed,
    euler_coefficients,
    hill_cost,
    merge,
    select_encrypted,
    update_encrypted,
)  # noqa: E402


def test_hill_cost_against_scipy():
    from scipy import ndimage

    x = torch.randn(2, 4, 20, 20, generator=torch.Generator().manual_seed(0))
    for b in range(2):
        X = x[b].double().sum(0).numpy()
        R = np.abs(ndimage.convolve(X, np.array([[-1, 2, -1], [2, -4, 2], [-1, 2, -1]], float), mode="mirror"))
        L1 = ndimage.uniform_filter(R, 3, mode="mirror")
        xi = np.where(L1 > 0, 1 / np.where(L1 > 0, L1, 1), 0)
        ref = ndimage.uniform_filter(xi, 15, mode="mirror")
        np.testing.assert_allclose(hill_cost(x)[b, 0].numpy(), ref, rtol=1e-10)


def test_encrypted_fraction_matches_the_reference_measurement():
    """τ = 0.01 on N(0, 1) latents leaves ≈ 88.5% encrypted (reference note §5: 0.885–0.889); the removed
    prefix is the smallest-distortion one and carries ≥ τ of the distortion."""
    x = torch.randn(3, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    keep = select_encrypted(x, tau=0.01)
    assert 0.87 <= keep.float().mean().item() <= 0.90
    d = (x.double().abs() * hill_cost(x)).expand_as(x)
    assert d[~keep].max() <= d[keep].min() and d[~keep].sum() >= 0.01 * d.sum()
    assert 0.60 <= select_encrypted(x, tau=0.1).float().mean().item() <= 0.70  # 0.65 in the note


def test_encrypted_update_and_merge_equal_the_plaintext_step():
    ctx = TenSEALContext.generate(PRESETS["precise"])
    g = torch.Generator().manual_seed(2)
    x, D = 3 * torch.randn(1, 4, 64, 64, generator=g), torch.randn(1, 4, 64, 64, generator=g)
    f, a = euler_coefficients(2.5, 1.7)
    add = (a * D).double().reshape(-1).numpy()
    keep = select_encrypted(x)
    idx, values, rem = coo_pack(x, keep)
    cts = encrypt_packed(ctx, values)
    assert len(cts) == -(-len(values) // 4096)
    out = update_encrypted(ctx, cts, f, add[idx])
    x_next = merge(f * rem + add, idx, np.concatenate([ctx.decrypt(c) for c in out]))
    ref = (f * x + a * D).double().reshape(-1).numpy()
    assert np.abs(x_next - ref).max() < 1e-5
