"""What a serialised TenSEAL context or CKKS vector holds, read from its bytes *before* loading it.

A server must not let TenSEAL load whatever a client sends: SEAL inflates every object it loads
(zstd) into memory before it checks the object against the context, and a TenSEAL CKKS vector is a
protobuf message that may carry any number of SEAL ciphertexts. A 500-byte ciphertext of zeros
inflates to 262 KB, a zstd block of one repeated byte to 128 KB per 4 bytes, and one "ciphertext"
may hold a thousand of them. This module reads the envelopes without inflating anything:

- the protobuf messages (``tenseal/proto/tensors.proto`` and ``tensealcontext.proto`` of TenSEAL
  0.3.18): field numbers, wire types, no unknown or repeated-where-single fields;
- each SEAL object's 16-byte header (magic 0xA15E, header size 16, version, compression mode,
  total size) and, for zstd, the frame and block headers (RFC 8878 §3.1), which give an upper
  bound on the inflated size: raw and RLE blocks state their size, a compressed block inflates to at
  most min(window, 128 KiB).

:func:`check_ciphertext` and :func:`check_context` refuse (:class:`EnvelopeError`) anything whose
inflated size exceeds what the caller's CKKS parameters allow, so loading it afterwards costs at
most that much memory. What the loaded object then holds (level, scale, number of polynomials) is
checked by :mod:`privdiff.he.ckks` after loading.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "EnvelopeError",
    "VectorEnvelope",
    "ContextEnvelope",
    "check_ciphertext",
    "check_context",
    "ciphertext_bytes",
    "ciphertext_wire_max",
    "public_key_bytes",
    "inflated_bound",
]

SEAL_MAGIC = 0xA15E
SEAL_HEADER = struct.Struct(
    "<HBBBBHQ"
)  # magic, header size, version major, minor, compression mode, reserved, total size
COMPR_NONE, COMPR_ZLIB, COMPR_ZSTD = 0, 1, 2
ZSTD_MAGIC = 0xFD2FB528
ZSTD_BLOCK_MAX = 128 * 1024
SEAL_CT_METADATA = (
    97  # parms_id 32, NTT flag 1, size 8, N 8, primes 8, scale 8, correction 8, DynArray header 16 + count 8
)
PARAMS_MAX = 16 * 1024  # serialised EncryptionParameters: a few hundred bytes


class EnvelopeError(ValueError):
    """Bytes that are not the expected TenSEAL/SEAL object, or that would inflate beyond the limit."""


def ciphertext_bytes(poly_modulus_degree: int, primes: int) -> int:
    """Inflated size of a 2-polynomial ciphertext over ``primes`` primes (what a fresh one holds)."""
    return 2 * poly_modulus_degree * primes * 8 + SEAL_CT_METADATA


def ciphertext_wire_max(inflated: int) -> int:
    """The most bytes a serialised CKKS vector holding one ciphertext of ``inflated`` bytes can take:
    the SEAL object uncompressed (or zstd of incompressible data: 3 bytes per 128 KiB block and a
    frame header more) in its protobuf envelope."""
    return inflated + 3 * (inflated // ZSTD_BLOCK_MAX + 1) + 256


def public_key_bytes(poly_modulus_degree: int, primes: int) -> int:
    """Inflated size of a public key (a ciphertext over the whole chain, special prime included)."""
    return ciphertext_bytes(poly_modulus_degree, primes)


# -- protobuf (proto3 wire format) ----------------------------------------------------------------
def _varint(data: bytes, off: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if off >= len(data) or shift > 63:
            raise EnvelopeError("truncated or overlong varint")
        b = data[off]
        off += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, off
        shift += 7


def _fields(data: bytes, what: str) -> list[tuple[int, int, object]]:
    """(field number, wire type, value) of a message: int for varints and fixed64, bytes for length-delimited."""
    out, off = [], 0
    while off < len(data):
        key, off = _varint(data, off)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, off = _varint(data, off)
        elif wire == 1:
            if off + 8 > len(data):
                raise EnvelopeError(f"{what}: truncated fixed64 field")
            value, off = data[off : off + 8], off + 8
        elif wire == 2:
            n, off = _varint(data, off)
            if off + n > len(data):
                raise EnvelopeError(f"{what}: field {number} runs past the end ({n} bytes)")
            value, off = data[off : off + n], off + n
        else:
            raise EnvelopeError(f"{what}: unexpected wire type {wire} (field {number})")
        out.append((number, wire, value))
    return out


def _single(fields, what: str, allowed: dict[int, tuple[int, ...]], repeated: tuple[int, ...] = ()) -> dict[int, list]:
    """Group fields by number; refuse unknown numbers, wrong wire types and repeats of single fields."""
    got: dict[int, list] = {}
    for number, wire, value in fields:
        if number not in allowed:
            raise EnvelopeError(f"{what}: unknown field {number}")
        if wire not in allowed[number]:
            raise EnvelopeError(f"{what}: field {number} has wire type {wire}")
        got.setdefault(number, []).append((wire, value))
        if len(got[number]) > 1 and number not in repeated:
            raise EnvelopeError(f"{what}: field {number} given more than once")
    return got


# -- SEAL objects ---------------------------------------------------------------------------------
def inflated_bound(blob: bytes, what: str) -> int:
    """Upper bound on the size SEAL inflates the serialised object ``blob`` to (refuses malformed headers)."""
    if len(blob) < SEAL_HEADER.size:
        raise EnvelopeError(f"{what}: shorter than a SEAL header")
    magic, hsize, _major, _minor, mode, reserved, total = SEAL_HEADER.unpack_from(blob)
    if magic != SEAL_MAGIC or hsize != SEAL_HEADER.size or reserved:
        raise EnvelopeError(f"{what}: not a SEAL object (bad header)")
    if total != len(blob):
        raise EnvelopeError(f"{what}: SEAL header says {total} bytes, got {len(blob)}")
    payload = memoryview(blob)[SEAL_HEADER.size :]
    if mode == COMPR_NONE:
        return len(payload)
    if mode == COMPR_ZSTD:
        return _zstd_bound(payload, what)
    raise EnvelopeError(f"{what}: SEAL compression mode {mode} is not accepted (none or zstd)")


def _zstd_bound(data: memoryview, what: str) -> int:
    """Upper bound on the inflated size of exactly one zstd frame filling ``data``."""
    n = len(data)
    if n < 6 or struct.unpack_from("<I", data, 0)[0] != ZSTD_MAGIC:
        raise EnvelopeError(f"{what}: not one zstd frame")
    fhd = data[4]
    fcs_flag, single, reserved, checksum, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 3) & 1, (fhd >> 2) & 1, fhd & 3
    if reserved or dict_flag:
        raise EnvelopeError(f"{what}: zstd frame with a dictionary or reserved bits")
    off = 5
    window = None
    if not single:
        wd = data[off]
        off += 1
        base = 1 << (10 + (wd >> 3))
        window = base + (base // 8) * (wd & 7)
    fcs_size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    fcs = None
    if fcs_size:
        if off + fcs_size > n:
            raise EnvelopeError(f"{what}: truncated zstd frame header")
        fcs = int.from_bytes(data[off : off + fcs_size], "little") + (256 if fcs_size == 2 else 0)
        off += fcs_size
    if single:
        window = fcs
    block_max = min(window, ZSTD_BLOCK_MAX)
    bound = 0
    while True:
        if off + 3 > n:
            raise EnvelopeError(f"{what}: truncated zstd block header")
        hdr = int.from_bytes(data[off : off + 3], "little")
        off += 3
        last, btype, size = hdr & 1, (hdr >> 1) & 3, hdr >> 3
        if btype == 3 or size > block_max:
            raise EnvelopeError(f"{what}: invalid zstd block")
        content = 1 if btype == 1 else size
        if off + content > n:
            raise EnvelopeError(f"{what}: truncated zstd block")
        off += content
        bound += block_max if btype == 2 else size
        if last:
            break
    off += 4 * checksum
    if off != n:
        raise EnvelopeError(
            f"{what}: {n - off} bytes after the zstd frame" if off < n else f"{what}: truncated zstd checksum"
        )
    return bound if fcs is None else min(bound, fcs)


def _check_seal(blob: bytes, what: str, limit: int) -> None:
    bound = inflated_bound(blob, what)
    if bound > limit:
        raise EnvelopeError(f"{what}: inflates to up to {bound} bytes, more than the {limit} its parameters allow")


# -- TenSEAL messages -----------------------------------------------------------------------------
@dataclass(frozen=True)
class VectorEnvelope:
    sizes: tuple[int, ...]
    scale: float
    ciphertexts: int


def check_ciphertext(
    data: bytes, *, max_inflated: int, size: int | None = None, max_size: int | None = None, scale: float | None = None
) -> VectorEnvelope:
    """Read a serialised TenSEAL ``CKKSVector``: it must hold exactly one SEAL ciphertext that inflates to
    at most ``max_inflated`` bytes, packing ``size`` values (or 1 to ``max_size``), at ``scale`` if given."""
    what = "ciphertext"
    got = _single(_fields(bytes(data), what), what, {1: (0, 2), 2: (2,), 3: (1,)}, repeated=(1, 2))
    sizes: list[int] = []
    for wire, value in got.get(1, []):
        if wire == 0:
            sizes.append(value)
        else:  # packed
            off = 0
            while off < len(value):
                v, off = _varint(value, off)
                sizes.append(v)
    cts = [v for _, v in got.get(2, [])]
    if len(cts) != 1 or len(sizes) != 1:
        raise EnvelopeError(
            f"{what}: a CKKS vector must hold exactly one ciphertext (got {len(cts)}, with {len(sizes)} sizes)"
        )
    if size is not None and sizes[0] != size:
        raise EnvelopeError(f"{what} holds {sizes[0]} values, expected {size}")
    if not 1 <= sizes[0] <= (max_size if max_size is not None else sizes[0]):
        raise EnvelopeError(f"{what} holds {sizes[0]} values, expected 1 to {max_size}")
    sc = struct.unpack("<d", got[3][0][1])[0] if 3 in got else 0.0
    if scale is not None and sc != scale:
        raise EnvelopeError(f"{what} has scale {sc!r}, the session's is {scale!r}")
    _check_seal(cts[0], what, max_inflated)
    return VectorEnvelope(tuple(sizes), sc, len(cts))


@dataclass(frozen=True)
class ContextEnvelope:
    has_secret_key: bool
    has_public_key: bool
    has_relin_keys: bool
    has_galois_keys: bool


def check_context(data: bytes, *, max_public_key: int) -> ContextEnvelope:
    """Read a serialised TenSEAL context without loading it: the encryption parameters and (optional)
    public key must inflate to a bounded size; the key flags say what else it carries (relinearisation
    and Galois keys are not inflation-checked: callers refuse contexts that carry them)."""
    what = "context"
    got = _single(_fields(bytes(data), what), what, {1: (2,), 2: (2,), 3: (2,), 4: (0,)})
    if 1 not in got:
        raise EnvelopeError(f"{what}: no encryption parameters")
    _check_seal(got[1][0][1], "encryption parameters", PARAMS_MAX)
    secret = 3 in got and bool(got[3][0][1])
    pub = {}
    if 2 in got:
        pub = _single(
            _fields(got[2][0][1], "public context"), "public context", {1: (2,), 2: (0,), 3: (1,), 4: (2,), 5: (2,)}
        )
    nonempty = lambda k: k in pub and bool(pub[k][0][1])  # noqa: E731
    env = ContextEnvelope(secret, nonempty(1), nonempty(4), nonempty(5))
    if env.has_public_key and not secret:
        _check_seal(pub[1][0][1], "public key", max_public_key)
    return env
