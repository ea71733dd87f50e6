"""What the service tests use: the plaintext image a served run gives (what every client must get), and
what the hostile-client tests send: hand-made TenSEAL/SEAL bytes (ciphertexts of zeros that inflate
far beyond their size, vectors holding many ciphertexts), raw HTTP requests from a chosen loopback
source address, and a ``privdiff he serve`` process on 127.0.0.1.

Everything here talks to 127.0.0.0/8 only (127.0.0.2 and 127.0.0.3 are loopback addresses too: they
stand for other clients)."""

from __future__ import annotations

import http.client
import json
import os
import re
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

CLIENTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
PROMPT = "a handwritten digit three"


def plaintext_image(run, *, seed: int, steps: int, sampler: str | None = None):
    """The image plaintext sampling of ``run`` gives for PROMPT (and its denoiser): what a client must get."""
    from privdiff.config import recipe_to_dict, resolve_recipe
    from privdiff.core.denoisers import load_decoder, load_denoiser
    from privdiff.core.generation import generate as sample_images

    over = [f"sampler.steps={steps}"] + ([f"sampler.name={sampler}"] if sampler else [])
    recipe = resolve_recipe(recipe_to_dict(run.load_config()), over)
    den = load_denoiser(run, recipe)
    return sample_images(
        den, labels=None, n=1, recipe=recipe, prompts=[PROMPT], decode=load_decoder(run), seed=seed, progress=False
    ), den


def psnr(a, b) -> float:
    return float(
        10 * np.log10(1.0 / max(float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)), 1e-20))
    )


# -- bytes ----------------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire)
    return key + (_varint(len(payload)) + payload if wire == 2 else payload)


def vector_proto(blobs: list[bytes], sizes: list[int], scale: float) -> bytes:
    """A TenSEAL CKKSVectorProto: packed sizes, the SEAL ciphertexts, the scale."""
    out = _field(1, 2, b"".join(_varint(s) for s in sizes))
    for b in blobs:
        out += _field(2, 2, b)
    return out + _field(3, 1, struct.pack("<d", scale))


def seal_blob(payload: bytes, *, version: bytes, mode: int) -> bytes:
    """A SEAL object: 16-byte header (magic, size 16, version, compression mode, total size) + payload."""
    return struct.pack("<HB2sBHQ", 0xA15E, 16, version, mode, 0, 16 + len(payload)) + payload


def zstd_frame(raw: bytes, zeros: int) -> bytes:
    """One zstd frame inflating to ``raw`` followed by ``zeros`` zero bytes: a raw block, then RLE
    blocks of 128 KiB (4 bytes each for 128 KiB of output)."""
    total = len(raw) + zeros
    out = bytearray(
        struct.pack("<IB", 0xFD2FB528, 0xA0) + struct.pack("<I", total)
    )  # single segment, 4-byte content size
    blocks = [(0, raw)] + [(1, min(1 << 17, zeros - i)) for i in range(0, zeros, 1 << 17)]
    for j, (kind, content) in enumerate(blocks):
        last = int(j == len(blocks) - 1)
        size = len(content) if kind == 0 else content
        out += (last | kind << 1 | size << 3).to_bytes(3, "little")
        out += content if kind == 0 else b"\0"
    return bytes(out)


@dataclass
class CiphertextShape:
    """What a ciphertext of a context looks like on the wire (read from a real one)."""

    parms_id: tuple[int, int, int, int]
    N: int
    primes: int
    scale: float
    slots: int
    version: bytes


def shape_of(ctx) -> CiphertextShape:
    """The fresh-ciphertext shape of a :class:`~privdiff.he.ckks.TenSEALContext` (from one encryption)."""
    import numpy as np

    ct = ctx.encrypt(np.zeros(1))
    (seal,) = ct.data.ciphertext()
    raw = ct.serialize()
    version = raw[raw.index(b"\x5e\xa1\x10") + 3 :][:2]
    return CiphertextShape(
        tuple(seal.parms_id()),
        seal.poly_modulus_degree(),
        seal.coeff_modulus_size(),
        seal.scale,
        ctx.params.slots,
        version,
    )


def zero_ciphertext(
    shape: CiphertextShape,
    *,
    polys: int = 2,
    primes: int | None = None,
    scale: float | None = None,
    size: int | None = None,
) -> bytes:
    """A serialised CKKS vector holding one ciphertext of zeros (``polys`` polynomials over ``primes``
    primes): a few hundred bytes on the wire, 2·N·primes·8 bytes (and more) once inflated."""
    primes = shape.primes if primes is None else primes
    scale = shape.scale if scale is None else scale
    count = polys * shape.N * primes
    meta = struct.pack("<4QBQQQdQ", *shape.parms_id, 1, polys, shape.N, primes, scale, 1)
    dyn_header = seal_blob(b"", version=shape.version, mode=0)[:8] + struct.pack("<Q", 16 + 8 + 8 * count)
    raw = meta + dyn_header + struct.pack("<Q", count)
    blob = seal_blob(zstd_frame(raw, 8 * count), version=shape.version, mode=2)
    return vector_proto([blob], [shape.slots if size is None else size], scale)


def many_ciphertexts(shape: CiphertextShape, n: int, *, size: int | None = None) -> bytes:
    """One "ciphertext" frame that is a CKKS vector of ``n`` ciphertexts of zeros (what TenSEAL loads whole)."""
    one = zero_ciphertext(shape)
    blob = one[one.index(b"\x5e\xa1\x10") :]
    blob = blob[: struct.unpack_from("<Q", blob, 8)[0]]
    return vector_proto([blob] * n, [shape.slots if size is None else size] * n, shape.scale)


# -- HTTP -----------------------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict

    @property
    def error(self) -> str:
        try:
            return json.loads(self.body)["error"]
        except (ValueError, KeyError, TypeError):
            return ""


def request(
    url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    source: str = "127.0.0.1",
    headers: dict | None = None,
    timeout: float = 60.0,
    chunked: bool = False,
) -> Answer:
    """One request from loopback address ``source`` (a fresh connection; ``chunked``: the body in
    chunked transfer encoding, without a Content-Length)."""
    m = re.match(r"http://(127\.[0-9.]+):(\d+)$", url)
    assert m, f"only loopback servers: {url}"
    conn = http.client.HTTPConnection(m.group(1), int(m.group(2)), timeout=timeout, source_address=(source, 0))
    try:
        conn.request(
            method, path, body=iter([body]) if chunked else body, headers=headers or {}, encode_chunked=chunked
        )
        r = conn.getresponse()
        return Answer(r.status, r.read(), {k.lower(): v for k, v in r.getheaders()})
    finally:
        conn.close()


# -- a real server --------------------------------------------------------------------------------
class ServerProcess:
    """``privdiff he serve RUN --port 0 ARGS...`` on 127.0.0.1 (the command users run)."""

    def __init__(self, run, *args: str, startup: float = 180.0):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "privdiff.cli",
                "he",
                "serve",
                str(run),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        self.lines: list[str] = []
        deadline = time.monotonic() + startup
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if m:
                self.url = m.group(1)
                return
        self.close()
        raise RuntimeError("the server did not start:\n" + "".join(self.lines))

    @property
    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def close(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return "".join(self.lines) + (out or "")
