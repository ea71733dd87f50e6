"""The CKKS backend against plaintext numpy on fresh random inputs, and the public context.

Tolerances: with the "precise" preset (Δ = 2^40) a fresh encryption is exact to ~1e-9 and one
ct ⊙ pt + rescale to ~1e-6 absolute on N(0, 1) inputs (he-diffusion.md §7: 5e-7); the tests
allow 1e-5 (1e-6 for enc/dec). The rotation test uses N = 4096 with a 109-bit chain [40, 29, 40], Δ = 2^29 (128-bit
security; tolerance 1e-3): it is about the slot arithmetic, and Galois keys at N = 8192 are slow.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tenseal")

from privdiff.he.ckks import PRESETS, CKKSError, CKKSParams, TenSEALContext  # noqa: E402


@pytest.fixture(scope="module")
def client():
    return TenSEALContext.generate(PRESETS["precise"])


@pytest.fixture(scope="module")
def server(client):
    return TenSEALContext.from_public_bytes(client.public_bytes(), allowed=(PRESETS["precise"],))


def fresh(n, seed):
    return np.random.default_rng(seed).standard_normal(n)


def test_encrypt_decrypt(client):
    x = fresh(4096, 1)
    assert np.abs(client.decrypt(client.encrypt(x)) - x).max() < 1e-6


def test_operations_on_the_server_match_numpy(client, server):
    n = 3000
    x, y, w, b = (fresh(n, s) for s in (2, 3, 4, 5))
    # the client encrypts and serialises; the server computes with public keys only
    cx = server.ciphertext_from_bytes(client.encrypt(x).serialize(), size=n)
    cy = server.ciphertext_from_bytes(client.encrypt(y).serialize(), size=n)
    back = lambda ct: client.decrypt(client.ciphertext_from_bytes(ct.serialize()))  # noqa: E731
    assert np.abs(back(server.mul_plain(cx, w)) - x * w).max() < 1e-5
    assert np.abs(back(server.add(cx, cy)) - (x + y)).max() < 1e-5
    assert np.abs(back(server.add_plain(cx, b)) - (x + b)).max() < 1e-5
    # the depth-1 update of a private-mode layer: Σ_k ct_k ⊙ w_k + b
    acc = server.add_plain(server.add(server.mul_plain(cx, w), server.mul_plain(cy, b)), x)
    assert np.abs(back(acc) - (x * w + y * b + x)).max() < 1e-5
    with pytest.raises(CKKSError):
        server.mul_plain(cx, w[:10])


def test_rotation():
    ctx = TenSEALContext.generate(CKKSParams(4096, (40, 29, 40), 29, galois_keys=True))
    x = fresh(16, 6)
    for k in (1, 5):
        assert np.abs(ctx.decrypt(ctx.rotate(ctx.encrypt(x), k)) - np.roll(x, -k)).max() < 1e-3
    with pytest.raises(CKKSError, match="Galois"):
        TenSEALContext.generate(PRESETS["small"]).rotate(ctx.encrypt(x), 1)


def test_public_context_has_no_secret_key_and_cannot_decrypt(client, server):
    import tenseal as ts

    raw = ts.context_from(client.public_bytes())
    assert not raw.has_secret_key() and raw.is_public()
    assert not server.has_secret_key
    ct = server.ciphertext_from_bytes(client.encrypt(fresh(8, 7)).serialize())
    with pytest.raises(CKKSError, match="secret key"):
        server.decrypt(ct)
    with pytest.raises(ValueError):  # not even TenSEAL's own decrypt works without the key
        ct.data.decrypt()
    # a context that carries the secret key is refused by a server
    with pytest.raises(CKKSError, match="secret key"):
        TenSEALContext.from_public_bytes(client._ctx.serialize(save_secret_key=True))


def test_bad_bytes_are_clear_errors(client, server):
    good = client.encrypt(fresh(100, 8)).serialize()
    other = TenSEALContext.generate(PRESETS["small"]).encrypt(fresh(100, 9)).serialize()
    # (A flipped byte inside the payload is not among them: CKKS ciphertexts carry no MAC, so a flip can
    # decode to a valid, wrong ciphertext, depending on where it lands; integrity on the wire is TLS's job.)
    for bad in (good[: len(good) // 2], b"\x00" * 64, b"", other):
        with pytest.raises(CKKSError):
            server.ciphertext_from_bytes(bad)
    with pytest.raises(CKKSError, match="expected 50"):
        server.ciphertext_from_bytes(good, size=50)
    with pytest.raises(CKKSError):
        TenSEALContext.from_public_bytes(b"not a context")
    with pytest.raises(CKKSError, match="not accepted"):
        TenSEALContext.from_public_bytes(
            TenSEALContext.generate(PRESETS["small"]).public_bytes(), allowed=(PRESETS["precise"],)
        )
