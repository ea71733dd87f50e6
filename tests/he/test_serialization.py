"""Reading TenSEAL/SEAL bytes before loading them, against TenSEAL's own loader.

Hand-made ciphertexts of zeros (a raw zstd block of metadata, then RLE blocks: a few hundred bytes
that SEAL inflates to 262 KB and more) show that the zstd walk bounds what SEAL really inflates: the
legitimate size loads in TenSEAL and passes; anything larger, a vector of many ciphertexts, another
scale or size, or a lower level is refused before TenSEAL sees it. Random corruptions of real
ciphertexts and contexts only ever give the module's own errors. CKKS: the "precise" preset (and
"reference" for sizes)."""

from __future__ import annotations

import random

import numpy as np
import pytest

pytest.importorskip("tenseal")

from privdiff.he.ckks import PRESETS, CKKSError, TenSEALContext  # noqa: E402
from privdiff.he.serialization import (
    EnvelopeError,
    check_ciphertext,
    check_context,
    ciphertext_bytes,  # noqa: E402
    ciphertext_wire_max,
    inflated_bound,
    public_key_bytes,
)

from .hostile import many_ciphertexts, seal_blob, shape_of, vector_proto, zero_ciphertext, zstd_frame  # noqa: E402


@pytest.fixture(scope="module")
def client():
    return TenSEALContext.generate(PRESETS["precise"])


@pytest.fixture(scope="module")
def reference():
    return TenSEALContext.generate(PRESETS["reference"])  # with its Galois keys, as the preset says


@pytest.fixture(scope="module")
def server(client):
    return TenSEALContext.from_public_bytes(client.public_bytes(), allowed=(PRESETS["precise"],))


def test_real_ciphertexts_pass_with_their_exact_inflated_size(client, reference):
    for name in ("precise", "reference", "small"):
        p = PRESETS[name]
        ctx = {"precise": client, "reference": reference}.get(name) or TenSEALContext.generate(p)
        blob = ctx.encrypt(np.random.default_rng(0).standard_normal(p.slots)).serialize()
        primes = len(p.coeff_mod_bit_sizes) - 1
        limit = ciphertext_bytes(p.poly_modulus_degree, primes)
        env = check_ciphertext(blob, max_inflated=limit, size=p.slots, scale=2.0**p.scale_bits)
        assert env.ciphertexts == 1 and env.sizes == (p.slots,)
        assert len(blob) <= ciphertext_wire_max(limit)
        with pytest.raises(EnvelopeError, match="inflates"):
            check_ciphertext(blob, max_inflated=limit - 1)


def test_hand_made_zero_ciphertexts_load_as_the_walk_says(client, server):
    shape = shape_of(client)
    z = zero_ciphertext(shape)
    assert len(z) < 200  # 262 KB once inflated
    ct = server.ciphertext_from_bytes(z, size=shape.slots, fresh=True)  # TenSEAL loads it: the walk is SEAL's format
    out = server.add_plain(server.mul_plain(ct, np.ones(shape.slots)), np.full(shape.slots, 0.5))
    assert np.abs(client.decrypt(client.ciphertext_from_bytes(out.serialize())) - 0.5).max() < 1e-6
    for bad, match in [
        (zero_ciphertext(shape, polys=3), "inflates"),
        (zero_ciphertext(shape, polys=16), "inflates"),
        (many_ciphertexts(shape, 300), "exactly one ciphertext"),
        (zero_ciphertext(shape, scale=2.0**41), "scale"),
        (zero_ciphertext(shape, size=100), "holds 100 values"),
        (zero_ciphertext(shape, size=5000), "5000 values"),
    ]:
        with pytest.raises(CKKSError, match=match):
            server.ciphertext_from_bytes(bad, size=shape.slots, fresh=True)
    # the server's own output is one level lower: refused as input (a product with a ciphertext of zeros
    # is SEAL's "transparent" zero, which TenSEAL replaces by a fresh encryption of zero: take a real one)
    real = server.ciphertext_from_bytes(client.encrypt(np.ones(shape.slots)).serialize(), fresh=True)
    out = server.mul_plain(real, np.ones(shape.slots))
    with pytest.raises(CKKSError, match="first level"):
        server.ciphertext_from_bytes(out.serialize(), fresh=True)
    server.ciphertext_from_bytes(out.serialize())  # (the client reads it)


def test_malformed_envelopes_are_refused(client):
    shape = shape_of(client)
    raw = b"\x01" * 97
    limit = ciphertext_bytes(shape.N, shape.primes)
    frame = zstd_frame(raw, 1000)

    def ct(blob):
        return vector_proto([blob], [shape.slots], shape.scale)

    assert inflated_bound(seal_blob(frame, version=shape.version, mode=2), "x") == 1097
    cases = {
        "zlib": seal_blob(frame, version=shape.version, mode=1),
        "trailing bytes": seal_blob(frame + b"\0", version=shape.version, mode=2),
        "two frames": seal_blob(frame + frame, version=shape.version, mode=2),
        "truncated": seal_blob(frame[:-2], version=shape.version, mode=2),
        "bad magic": seal_blob(b"\0" * 8 + frame[8:], version=shape.version, mode=2),
        "size mismatch": seal_blob(frame, version=shape.version, mode=2)[:-1],
        "reserved block": seal_blob(frame[:9] + bytes([frame[9] | 6]) + frame[10:], version=shape.version, mode=2),
    }
    for name, blob in cases.items():
        with pytest.raises(EnvelopeError):
            check_ciphertext(ct(blob), max_inflated=limit)
            pytest.fail(name)
    for proto in (b"", b"\xff", b"\x0a\x80", vector_proto([], [], shape.scale), b"\x08\x01" * 3, b"\x20\x01"):
        with pytest.raises(EnvelopeError):
            check_ciphertext(proto, max_inflated=limit)


def test_random_corruptions_give_only_clean_errors(client, server):
    rnd = random.Random(0)
    good = client.encrypt(np.random.default_rng(1).standard_normal(64)).serialize()
    ctx_bytes = client.public_bytes()
    for i in range(300):
        src = good if i % 2 else ctx_bytes
        b = bytearray(src)
        kind = rnd.random()
        if kind < 0.4:
            for _ in range(rnd.randint(1, 8)):
                b[rnd.randrange(min(len(b), 200))] = rnd.randrange(256)  # the envelope and headers
        elif kind < 0.7:
            b = b[: rnd.randrange(len(b))]
        else:
            b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
        try:
            if src is good:
                server.ciphertext_from_bytes(bytes(b), fresh=True)
            else:
                TenSEALContext.from_public_bytes(bytes(b), allowed=(PRESETS["precise"],))
        except CKKSError:
            pass


def test_contexts_carry_only_what_a_server_needs(client, reference):
    import tenseal as ts

    pub = client.public_bytes()
    env = check_context(pub, max_public_key=public_key_bytes(8192, 3))
    assert env.has_public_key and not (env.has_secret_key or env.has_relin_keys or env.has_galois_keys)
    assert len(pub) < 500_000
    assert check_context(client._ctx.serialize(save_secret_key=True), max_public_key=1 << 30).has_secret_key
    with pytest.raises(EnvelopeError, match="public key"):
        check_context(pub, max_public_key=1000)
    with pytest.raises(CKKSError, match="Galois or relinearisation"):
        TenSEALContext.from_public_bytes(client._ctx.serialize(), allowed=(PRESETS["precise"],))
    bfv = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=4096, plain_modulus=1032193)
    with pytest.raises(CKKSError, match="not CKKS"):
        TenSEALContext.from_public_bytes(
            bfv.serialize(save_secret_key=False, save_relin_keys=False, save_galois_keys=False)
        )
    # the reference preset's context: its 97 MB of Galois keys stay on the client
    assert reference._ctx.has_galois_keys() and len(reference.public_bytes()) < 1 << 20
    TenSEALContext.from_public_bytes(reference.public_bytes(), allowed=(PRESETS["reference"],))
