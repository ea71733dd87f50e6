"""A small CKKS backend interface and its TenSEAL implementation.

The secret key exists only in a *client* context (:meth:`TenSEALContext.generate`). What leaves the
client is :meth:`~TenSEALContext.public_bytes`: the parameters, the scale and the public key, from
which a *server* context (:meth:`TenSEALContext.from_public_bytes`) can compute ct ⊙ pt, ct + ct and
ct + pt on the client's ciphertexts but never decrypt. Contexts and ciphertexts from a client are read
before TenSEAL loads them (:mod:`privdiff.he.serialization`), so a hostile one cannot make the server
inflate more than its parameters allow.

Operations (Cheon, Kim, Kim & Song 2017, "CKKS"): encrypt/decrypt of real vectors packed into the
N/2 slots of a ciphertext, ct ⊙ pt (slot-wise product with a plaintext vector, one rescale), ct + ct,
ct + pt, cyclic rotation of the slots, and (de)serialisation. TenSEAL 0.3.18's Python API has no raw
slot rotation; :meth:`TenSEALContext.rotate` is therefore the vector × (cyclic-shift matrix) product
(``CKKSVector.mm``), which costs about n internal rotations for an n-vector. privdiff's protocols
never rotate on the server (``privdiff.he.private`` packs so that none is needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["CKKSParams", "PRESETS", "CKKSError", "Ciphertext", "TenSEALContext"]


class CKKSError(ValueError):
    """A context or ciphertext that cannot be used (malformed, truncated, other parameters, wrong size)."""


@dataclass(frozen=True)
class CKKSParams:
    """CKKS parameters: ring degree N (N/2 slots), the bit sizes of the modulus chain, scale Δ = 2^scale_bits."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60)
    scale_bits: int = 40
    galois_keys: bool = False  # needed only by rotate()

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    def to_dict(self) -> dict[str, Any]:
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
            "galois_keys": self.galois_keys,
        }


PRESETS: dict[str, CKKSParams] = {
    # depth 1 (one ct × pt per round trip), 160-bit modulus: 128-bit security at N = 8192 (HE standard: ≤ 218 bits)
    "precise": CKKSParams(),
    # HE-Diffusion's context as released: N = 8192, [31, 26×6, 31], Δ = 2^26, Galois keys generated but unused
    "reference": CKKSParams(8192, (31, 26, 26, 26, 26, 26, 26, 31), 26, True),
    # small and fast, for tests of what is not about precision or security: N = 4096, 100-bit modulus (≤ 109 bits: 128-bit)
    "small": CKKSParams(4096, (40, 20, 40), 20),
}


class Ciphertext:
    """One CKKS ciphertext holding ``size`` packed real values (a TenSEAL ``CKKSVector``)."""

    __slots__ = ("data",)

    def __init__(self, data: Any):
        self.data = data

    @property
    def size(self) -> int:
        return self.data.size()

    def serialize(self) -> bytes:
        return self.data.serialize()


class TenSEALContext:
    """A CKKS context: the client's (with the secret key) or a server's (public keys only)."""

    def __init__(self, context: Any, params: CKKSParams):
        self._ctx, self.params = context, params

    # -- keys and contexts --------------------------------------------------------------------
    @classmethod
    def generate(cls, params: CKKSParams = PRESETS["precise"]) -> "TenSEALContext":
        """A fresh client context: new secret, public (and optionally Galois) keys."""
        import tenseal as ts

        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        )
        ctx.global_scale = 2.0**params.scale_bits
        if params.galois_keys:
            ctx.generate_galois_keys()
        return cls(ctx, params)

    @property
    def has_secret_key(self) -> bool:
        return bool(self._ctx.has_secret_key())

    def public_bytes(self) -> bytes:
        """The serialised context *without* the secret key, and without relinearisation and Galois
        keys: the parameters, the scale and the public key, all a server needs to compute ct ⊙ pt,
        ct + ct and ct + pt on ciphertexts under it (the public key only to stand in an encryption
        of zero where a product is exactly zero). The reference preset's Galois keys alone are 97 MB."""
        return self._ctx.serialize(
            save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
        )

    @classmethod
    def from_public_bytes(cls, data: bytes, *, allowed: tuple[CKKSParams, ...] | None = None) -> "TenSEALContext":
        """A server context from a client's :meth:`public_bytes`.

        The bytes are read before TenSEAL loads them (:func:`privdiff.he.serialization.check_context`).
        Raises :class:`CKKSError` for bytes that are not a CKKS context, for a context that holds a
        secret key (a server must never receive one) or relinearisation or Galois keys (never used
        here: refused rather than kept in memory), and for parameters not in ``allowed``."""
        import tenseal as ts

        from .serialization import EnvelopeError, check_context, public_key_bytes

        biggest = (
            max(((p.poly_modulus_degree, len(p.coeff_mod_bit_sizes)) for p in allowed), default=(8192, 8))
            if allowed
            else (32768, 16)
        )
        try:
            env = check_context(data, max_public_key=public_key_bytes(*biggest))
        except EnvelopeError as e:
            raise CKKSError(f"not a serialised CKKS context ({e})") from None
        if env.has_secret_key:
            raise CKKSError("the context holds a secret key: send only the public context")
        if env.has_galois_keys or env.has_relin_keys:
            raise CKKSError(
                "the context carries Galois or relinearisation keys, which this server never uses: "
                "send it without them (TenSEALContext.public_bytes())"
            )
        try:
            ctx = ts.context_from(bytes(data), n_threads=1)
        except Exception as e:
            raise CKKSError(f"not a serialised CKKS context ({str(e)[:120]})") from None
        if ctx.has_secret_key():
            raise CKKSError("the context holds a secret key: send only the public context")
        scheme = getattr(ctx.seal_context().data.key_context_data().parms().scheme(), "name", "?")
        if scheme != "CKKS":
            raise CKKSError(f"the context's scheme is {scheme}, not CKKS")
        shape = _shape_of(ctx)
        galois = bool(ctx.has_galois_keys())
        if allowed is None:
            return cls(ctx, CKKSParams(shape[0], (), shape[3], galois))
        for p in allowed:
            if shape == (p.poly_modulus_degree, sum(p.coeff_mod_bit_sizes), len(p.coeff_mod_bit_sizes), p.scale_bits):
                return cls(ctx, CKKSParams(p.poly_modulus_degree, p.coeff_mod_bit_sizes, p.scale_bits, galois))
        raise CKKSError(
            f"CKKS parameters (N={shape[0]}, {shape[2]} primes of {shape[1]} bits, scale 2^{shape[3]}) "
            f"are not accepted here (accepted: {', '.join(str(q.to_dict()) for q in allowed)})"
        )

    # -- encryption ---------------------------------------------------------------------------
    def encrypt(self, values: np.ndarray) -> Ciphertext:
        """Encrypt a real vector of at most N/2 values (packed into the slots)."""
        import tenseal as ts

        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if not 0 < v.size <= self.params.slots:
            raise CKKSError(f"{v.size} values do not fit one ciphertext ({self.params.slots} slots)")
        return Ciphertext(ts.ckks_vector(self._ctx, v.tolist()))

    def decrypt(self, ct: Ciphertext) -> np.ndarray:
        """The packed values of ``ct`` (needs the secret key)."""
        if not self.has_secret_key:
            raise CKKSError("this context has no secret key: only the client can decrypt")
        return np.asarray(ct.data.decrypt(), dtype=np.float64)

    # -- operations (evaluated with public keys only) -----------------------------------------
    def mul_plain(self, ct: Ciphertext, values: np.ndarray) -> Ciphertext:
        """ct ⊙ pt: slot-wise product with a plaintext vector of the same size (one rescale)."""
        return Ciphertext(ct.data.mul(_plain(values, ct)))

    def add(self, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        """ct + ct (same size and level)."""
        return Ciphertext(a.data.add(b.data))

    def add_plain(self, ct: Ciphertext, values: np.ndarray) -> Ciphertext:
        """ct + pt."""
        return Ciphertext(ct.data.add(_plain(values, ct)))

    def rotate(self, ct: Ciphertext, steps: int) -> Ciphertext:
        """Cyclic left rotation of the ``size`` packed values by ``steps``: out_j = in_{(j + steps) mod n}.

        Computed as ct × P with the plaintext cyclic-shift matrix P (TenSEAL has no raw rotation in
        Python); needs Galois keys and costs about n slot rotations."""
        if not self.params.galois_keys:
            raise CKKSError("rotate() needs a context with Galois keys (CKKSParams(galois_keys=True))")
        n = ct.size
        P = np.zeros((n, n))
        P[(np.arange(n) + steps) % n, np.arange(n)] = 1.0  # P[i, j] = 1 iff i = (j + steps) mod n
        return Ciphertext(ct.data.mm(P.tolist()))

    # -- serialisation ------------------------------------------------------------------------
    def check_ciphertext_bytes(self, data: bytes, *, size: int | None = None, fresh: bool = False) -> None:
        """What :meth:`ciphertext_from_bytes` checks before loading (one ciphertext, its inflated size,
        ``size`` values, and for ``fresh`` the context's scale), without loading it: :class:`CKKSError`."""
        from .serialization import EnvelopeError, check_ciphertext, ciphertext_bytes

        primes = self._ctx.seal_context().data.first_context_data().chain_index() + 1
        try:
            check_ciphertext(
                data,
                max_inflated=ciphertext_bytes(self.params.poly_modulus_degree, primes),
                size=size,
                max_size=self.params.slots,
                scale=self._ctx.global_scale if fresh else None,
            )
        except EnvelopeError as e:
            raise CKKSError(str(e)) from None

    def ciphertext_from_bytes(self, data: bytes, *, size: int | None = None, fresh: bool = False) -> Ciphertext:
        """Load a serialised ciphertext into this context; :class:`CKKSError` if it is malformed,
        truncated, made under other parameters, holds more than one ciphertext or would inflate beyond
        one (checked before loading), or (``size``) does not hold ``size`` values.

        ``fresh``: it must be as the client encrypts it, at the first level of the chain and at the
        context's scale (what a server computes on: its own output, one level lower, is refused)."""
        import tenseal as ts

        self.check_ciphertext_bytes(data, size=size, fresh=fresh)
        sc = self._ctx.seal_context().data
        N, primes = self.params.poly_modulus_degree, sc.first_context_data().chain_index() + 1
        scale = self._ctx.global_scale
        try:
            ct = Ciphertext(ts.ckks_vector_from(self._ctx, bytes(data)))
            n = ct.size
            (seal,) = ct.data.ciphertext()
            shape = (seal.size(), seal.poly_modulus_degree(), bool(seal.is_ntt_form()))
            top = seal.parms_id() == sc.first_parms_id() and seal.coeff_modulus_size() == primes and seal.scale == scale
        except Exception as e:
            raise CKKSError(f"malformed ciphertext ({str(e)[:120]})") from None
        if shape != (2, N, True):
            raise CKKSError(
                f"not a 2-polynomial CKKS ciphertext of degree {N} ({shape[0]} polynomials of degree {shape[1]}, NTT form {shape[2]})"
            )
        if fresh and not top:
            raise CKKSError(
                "the ciphertext is not at the first level and scale of the session's context "
                "(a server's output cannot be computed on again)"
            )
        if n <= 0 or (size is not None and n != size):
            raise CKKSError(f"ciphertext holds {n} values, expected {size if size is not None else '> 0'}")
        return ct


def _plain(values: np.ndarray, ct: Ciphertext) -> list[float]:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size != ct.size:
        raise CKKSError(f"plaintext of {v.size} values for a ciphertext of {ct.size}")
    return v.tolist()


def _shape_of(ctx: Any) -> tuple[int, int, int, int]:
    """(N, total modulus bits, number of primes, log2 Δ) of a TenSEAL context (SEAL's bindings expose
    no single prime, so the chain is identified by its total size and length)."""
    import math

    key = ctx.seal_context().data.key_context_data()
    return (
        int(key.parms().poly_modulus_degree()),
        int(key.total_coeff_modulus_bit_count()),
        int(key.chain_index()) + 1,
        int(round(math.log2(ctx.global_scale))),
    )
