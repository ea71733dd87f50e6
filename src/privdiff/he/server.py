"""The encrypted-inference HTTP service (aiohttp): ``privdiff he serve RUN``.

Routes (all under ``/v1``; errors are JSON ``{"error": reason}`` with a 4xx or 503 status, and a
``Retry-After`` header where trying later may succeed):

| route | body | answer |
|---|---|---|
| ``GET /v1/info`` | — | modes, the network's layer sizes (no weights), sampler and diffusion settings, limits |
| ``GET /v1/client-model`` | — | safetensors: the client's part (class embedder, text encoder, autoencoder), trained on public data or released with DP |
| ``POST /v1/sessions?mode=private`` | a public CKKS context | ``{"session": token}``; a context with any key is refused |
| ``POST /v1/sessions?mode=compat&prompt=P&guidance=G`` | a public CKKS context | ``{"session": token}`` (compat mode; a pipeline server also takes ``steps=N``) |
| ``POST /v1/sessions/{token}/linear?layers=a,b&positions=P`` | framed ciphertexts | framed ciphertexts (private mode) |
| ``POST /v1/sessions/{token}/compat-step?sigma=S&sigma_next=S'`` | framed ciphertexts + plaintext parts | compat mode (HE-Diffusion) |
| ``POST /v1/sessions/{token}/compat-step?step=i`` | the same | compat mode on a pipeline (PLMS update i) |
| ``DELETE /v1/sessions/{token}`` | — | 204 |

A run trained with ``ldm.net: he`` serves both modes (:func:`load_service`); ``privdiff he serve --pipeline DIR``
serves a Stable-Diffusion-style pipeline in compat mode only (:func:`load_pipeline_service`), and its
``/v1/client-model`` is the pipeline's VAE decoder (the client decodes the image).

Ciphertext frames: ``b"PDCT"``, a little-endian u32 count, then per ciphertext a u32 length and its bytes.

What a hostile client cannot do (docs/he.md, "Service limits"): every query parameter and body is
checked at the boundary (unknown or repeated parameters, non-finite numbers, out-of-range values
are 400s); a body may be at most what its route needs (the protocol knows how many ciphertexts a
request carries and how large each can inflate: :mod:`privdiff.he.serialization`), is refused (413)
before it is read, and must arrive within ``body_timeout_s``; bodies and their decoded ciphertexts
being handled are bounded together (``max_inflight_mb``, 503 beyond); sessions are capabilities
bound to the address that opened them, and the session table never evicts another client's active
session (:class:`~privdiff.he.protocol.SessionTable`); work runs on a fair queue whose running
requests stop within one homomorphic operation after ``timeout_s``
(:class:`~privdiff.he.protocol.FairScheduler`); freed memory is given back to the system.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
import sys
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass, asdict
from pathlib import Path

from .ckks import CKKSError, CKKSParams
from .private import PrivateServer
from .protocol import (
    FairScheduler,
    MemoryTrimmer,
    PayloadTooLarge,
    ProtocolError,
    ServerBusy,
    SessionNotFound,
    SessionTable,
    server_allocator,
    trim_memory,
)
from .serialization import PARAMS_MAX, EnvelopeError, ciphertext_bytes, ciphertext_wire_max, public_key_bytes

__all__ = [
    "ServiceConfig",
    "build_app",
    "encode_frames",
    "decode_frames",
    "client_model_bytes",
    "decoder_bytes",
    "load_pipeline_service",
    "load_service",
    "pipeline_service",
    "serve",
]

MAGIC = b"PDCT"
SCHEDULER = (
    None  # the app key of the FairScheduler of an app from build_app (an aiohttp AppKey once aiohttp is imported)
)


class LengthRequired(ProtocolError):
    status = 411


class RequestTimeout(ProtocolError):
    status = 408


@dataclass(frozen=True)
class ServiceConfig:
    """Limits of the service (``privdiff he serve`` flags in parentheses; docs/he.md, "Service limits")."""

    max_body_mb: float = (
        64.0  # (--max-body-mb) no request body may be larger (413); each route allows only what it needs
    )
    timeout_s: float = 120.0  # (--timeout) a request that computes longer is stopped (503)
    workers: int = 2  # (--workers) threads doing HE work
    max_sessions: int = 16  # (--max-sessions) per mode
    max_client_sessions: int = 4  # (--max-client-sessions) per mode and remote address
    max_client_jobs: int | None = None  # (--max-client-jobs) running requests per remote address (None: workers)
    session_ttl_s: float = 600.0  # (--session-ttl) an idle session is dropped after it
    session_idle_s: float | None = (
        None  # a session idle this long (or opened and unused for 10 s) may be evicted when a limit is reached (None: 60 s, at most the TTL)
    )
    queue_timeout_s: float = 60.0  # a request waiting longer for a worker gets 503
    body_timeout_s: float = 30.0  # a body that has not arrived within it gets 408
    max_inflight_mb: float = 256.0  # bodies and decoded ciphertexts of the requests being handled (503 beyond)

    def __post_init__(self):
        if self.session_idle_s is None:
            ttl = self.session_ttl_s
            object.__setattr__(
                self, "session_idle_s", min(60.0, ttl) if isinstance(ttl, (int, float)) and ttl > 0 else 60.0
            )
        for name in (
            "max_body_mb",
            "timeout_s",
            "session_ttl_s",
            "session_idle_s",
            "queue_timeout_s",
            "body_timeout_s",
            "max_inflight_mb",
        ):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        for name in ("workers", "max_sessions", "max_client_sessions"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.max_client_jobs is not None and not (
            isinstance(self.max_client_jobs, int) and self.max_client_jobs >= 1
        ):
            raise ValueError(f"max_client_jobs must be an integer >= 1, got {self.max_client_jobs!r}")
        if self.session_idle_s > self.session_ttl_s:
            raise ValueError(
                f"session_idle_s ({self.session_idle_s:g}) must not exceed session_ttl_s ({self.session_ttl_s:g})"
            )

    def session_table(self, on_drop=None) -> SessionTable:
        return SessionTable(
            max_sessions=self.max_sessions,
            ttl=self.session_ttl_s,
            max_per_owner=self.max_client_sessions,
            idle_evict=self.session_idle_s,
            on_drop=on_drop,
        )


def encode_frames(items: list[bytes]) -> bytes:
    """b"PDCT" + u32 count + (u32 length + bytes)* (little-endian)."""
    out = [MAGIC, struct.pack("<I", len(items))]
    for b in items:
        out += [struct.pack("<I", len(b)), b]
    return b"".join(out)


def decode_frames(
    data: bytes, *, max_items: int = 100_000, count: int | None = None, max_item: int | None = None
) -> list[bytes]:
    """Inverse of :func:`encode_frames`; :class:`ProtocolError` for anything malformed or truncated,
    for other than ``count`` items (when given) or more than ``max_items``, and for an item longer
    than ``max_item`` bytes."""
    if len(data) < 8 or data[:4] != MAGIC:
        raise ProtocolError("body is not a ciphertext frame (expected magic PDCT)")
    (n,) = struct.unpack_from("<I", data, 4)
    if count is not None and n != count:
        raise ProtocolError(f"{n} ciphertexts in the request; this request carries exactly {count}")
    if n > max_items:
        raise ProtocolError(f"{n} items in one request (at most {max_items})")
    items, off = [], 8
    view = memoryview(data)
    for i in range(n):
        if off + 4 > len(data):
            raise ProtocolError(f"frame truncated at item {i} of {n}")
        (m,) = struct.unpack_from("<I", data, off)
        off += 4
        if max_item is not None and m > max_item:
            raise ProtocolError(f"item {i} is {m} bytes, at most {max_item} here")
        if off + m > len(data):
            raise ProtocolError(f"frame truncated inside item {i} of {n}")
        items.append(bytes(view[off : off + m]))
        off += m
    if off != len(data):
        raise ProtocolError(f"{len(data) - off} trailing bytes after {n} items")
    return items


def client_model_bytes(net, autoencoder) -> bytes:
    """The client's part as one safetensors file: class embedder, text encoder (the prompt is encoded
    on the client) and the autoencoder (the image is decoded on the client); configs in its metadata."""
    import dataclasses

    from safetensors.torch import save

    state = {f"class_embedder.{k}": v for k, v in net.class_embedder.state_dict().items()}
    state |= {f"text_encoder.{k}": v for k, v in net.text_encoder.state_dict().items()}
    state |= {f"autoencoder.{k}": v for k, v in autoencoder.state_dict().items()}
    meta = {
        "num_classes": str(net.num_classes),
        "text": json.dumps(dataclasses.asdict(net.text_encoder.config)),
        "tokenizer": json.dumps(net.text_encoder.tokenizer.to_dict()),
        "autoencoder": json.dumps({k: v for k, v in dict(autoencoder.config).items() if not k.startswith("_")}),
    }
    return save({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=meta)


def decoder_bytes(vae) -> bytes:
    """The client's part of a pipeline as one safetensors file: its VAE's decoder (``post_quant_conv`` and
    ``decoder``; the image is decoded on the client), the VAE's config in the metadata."""
    from safetensors.torch import save

    state = {k: v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    meta = {
        "kind": "pipeline-vae",
        "vae": json.dumps({k: v for k, v in dict(vae.config).items() if not k.startswith("_")}),
    }
    return save({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=meta)


@dataclass
class Service:
    private: PrivateServer | None  # None: a pipeline, compat mode only
    info: dict
    client_model: bytes
    config: ServiceConfig
    compat: object | None = None  # privdiff.he.compat.CompatServer
    trimmer: MemoryTrimmer | None = None


def load_service(run: str | Path, *, config: ServiceConfig = ServiceConfig(), permute: bool = True) -> Service:
    """The service of a run trained with ``ldm.net: he`` (its EMA denoiser, sampler settings and autoencoder)."""
    import torch

    from ..config import recipe_to_dict
    from ..core.denoisers import make_denoiser
    from ..runs import Run, RunError
    from .compat import CompatServer
    from ..models.he_net import HENet

    r = Run(run)
    recipe = r.load_config()
    net = r.load_net(ema=True).eval()
    if not isinstance(net, HENet):
        raise RunError(
            f"{r.path}: its denoiser is not the HE-friendly one (train with ldm.net=he, e.g. the he-ldm-mnist5k recipe)"
        )
    ae_dir = r.path / "autoencoder"
    if not (ae_dir / "config.json").is_file():
        raise RunError(f"{r.path}: no autoencoder/ (not a latent-diffusion run)")
    from diffusers import AutoencoderKL

    ae = AutoencoderKL.from_pretrained(
        ae_dir, local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False
    ).eval()
    trimmer = MemoryTrimmer()
    with torch.no_grad():  # T, the length of the conditioning the keys and values are computed on
        tokens = int(net.context(net.conditions(n=1)).shape[1])
    private = PrivateServer(
        net.unet,
        permute=permute,
        max_rows=2,
        context_tokens=tokens,
        sessions=config.session_table(on_drop=trimmer.request),
    )
    compat = CompatServer(
        make_denoiser(recipe, net),
        sigma_max=recipe.sampler.sigma_max,
        sessions=config.session_table(on_drop=trimmer.request),
    )
    d = recipe_to_dict(recipe)
    limits = {k: v for k, v in asdict(config).items()}
    limits |= {
        "max_body_bytes": int(config.max_body_mb * 2**20),
        "max_positions": private.max_positions,
        "max_rows": private.max_rows,
        "context_tokens": tokens,
        "compat_ckks": [dict(p.to_dict(), galois_keys=False) for p in compat.params],
    }
    info = {
        "modes": ["private", "compat"],
        "model": private.spec(),
        "sampler": d["sampler"],
        "diffusion": d["diffusion"],
        "limits": limits,
    }
    return Service(private, info, client_model_bytes(net, ae), config, compat, trimmer)


def load_pipeline_service(
    path: str | Path, *, config: ServiceConfig = ServiceConfig(), device: str | None = None
) -> Service:
    """The compat-mode service of the Stable-Diffusion-style pipeline at ``path`` (``model_index.json``, ``unet/``,
    ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``): HE-Diffusion with PLMS on the pipeline's UNet
    (:func:`pipeline_service`); a one-line ValueError for anything else. ``device``: where the UNet runs
    (default: CUDA when present)."""
    from ..models.pretrained import load_pipeline_vae, load_text_pipeline

    return pipeline_service(load_text_pipeline(path), load_pipeline_vae(path), config=config, device=device)


def pipeline_service(net, vae, *, config: ServiceConfig = ServiceConfig(), device: str | None = None) -> Service:
    """The compat-mode service of a pipeline's net (:func:`privdiff.models.pretrained.load_text_pipeline`'s: UNet,
    CLIP, tokenizer, scheduler config) and its VAE (:class:`~privdiff.he.compat.PipelineCompatServer`; the client
    gets the VAE's decoder). ``device``: where the UNet runs (default: CUDA when present)."""
    import torch

    from .compat import PipelineCompatServer

    trimmer = MemoryTrimmer()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    compat = PipelineCompatServer(net.eval(), device=device, sessions=config.session_table(on_drop=trimmer.request))
    limits = dict(asdict(config))
    limits |= {
        "max_body_bytes": int(config.max_body_mb * 2**20),
        "max_steps": compat.max_steps,
        "compat_ckks": [dict(p.to_dict(), galois_keys=False) for p in compat.params],
    }
    info = {
        "modes": ["compat"],
        "kind": "pipeline",
        "model": {
            "latent_shape": list(net.sample_shape),
            "prediction_type": net.schedule.prediction_type,
            "scaling_factor": float(vae.config.scaling_factor),
        },
        # SD's defaults: 50 PLMS steps, guidance scale 7.5 (privdiff's w = scale − 1)
        "sampler": {"scheduler": "pndm", "steps": 50, "guidance": 6.5},
        "limits": limits,
    }
    return Service(None, info, decoder_bytes(vae), config, compat, trimmer)


def _data_primes(p: CKKSParams) -> int:
    return len(p.coeff_mod_bit_sizes) - 1


class _Budget:
    """Bytes of request bodies and decoded ciphertexts held at once (event-loop thread only)."""

    def __init__(self, total: int, on_release=None):
        self.total, self.used, self._on_release = total, 0, on_release

    @asynccontextmanager
    async def hold(self, n: int):
        if self.used + n > self.total:
            raise ServerBusy(
                f"the server is handling {self.used >> 20} MB of requests (at most {self.total >> 20} MB): retry later",
                retry_after=1,
            )
        self.used += n
        try:
            yield
        finally:
            self.used -= n
            if self._on_release is not None:
                self._on_release()


def build_app(service: Service):
    """The aiohttp application of ``service`` (see the module docstring for the routes)."""
    from aiohttp import web

    global SCHEDULER
    if SCHEDULER is None:
        SCHEDULER = web.AppKey("scheduler", FairScheduler)
    cfg = service.config
    trimmer = service.trimmer or MemoryTrimmer()
    sched = FairScheduler(
        cfg.workers,
        timeout=cfg.timeout_s,
        queue_timeout=cfg.queue_timeout_s,
        max_running_per_group=cfg.max_client_jobs,
        max_pending_per_key=2,
        max_pending=8 * cfg.max_sessions,
        on_idle=trimmer.request,
    )
    budget = _Budget(int(cfg.max_inflight_mb * 2**20), on_release=trimmer.request)
    max_body = int(cfg.max_body_mb * 2**20)
    compat = service.compat
    private = service.private
    open_params = (private.params if private is not None else ()) + (compat.params if compat is not None else ())
    # a public context: parameters, and at most a public key (no relinearisation or Galois keys)
    open_limit = (
        PARAMS_MAX
        + max(public_key_bytes(p.poly_modulus_degree, len(p.coeff_mod_bit_sizes)) for p in open_params)
        + 4096
    )

    def error(status: int, message: str, retry_after: float | None = None, headers: dict | None = None):
        h = dict(headers or {})
        if retry_after is not None:
            h["Retry-After"] = str(max(1, math.ceil(retry_after)))
        return web.json_response({"error": message}, status=status, headers=h)

    @web.middleware
    async def errors(request, handler):
        try:
            return await handler(request)
        except ProtocolError as e:
            return error(e.status, str(e), e.retry_after)
        except (CKKSError, EnvelopeError) as e:
            return error(400, str(e))
        except web.HTTPException as e:
            if e.status < 400:
                raise
            if e.status == 413:
                return error(413, f"request body larger than {cfg.max_body_mb:g} MB")
            if e.status == 405:
                return error(
                    405,
                    f"method {request.method} is not allowed on {request.path[:100]}",
                    headers={"Allow": e.headers.get("Allow", "")},
                )
            if e.status == 404:
                return error(404, f"no route {request.path[:100]!r} (see GET /v1/info)")
            return error(e.status, e.reason or e.text or "refused")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug: say so, keep serving
            print(f"privdiff he: internal error on {request.method} {request.path[:100]}", file=sys.stderr)
            traceback.print_exc()
            return error(500, f"internal error ({type(e).__name__})")

    def query(request, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, str]:
        keys = [k for k, _ in request.query.items()]  # .keys() would fold repeats
        unknown = sorted({k for k in keys if k not in allowed})
        if unknown:
            raise ProtocolError(
                f"unknown query parameter(s) {', '.join(repr(k[:40]) for k in unknown[:5])} (allowed: {', '.join(allowed)})"
            )
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ProtocolError(f"query parameter(s) {', '.join(repeated)} given more than once")
        missing = [k for k in required if k not in keys]
        if missing:
            raise ProtocolError(f"missing query parameter(s) {', '.join(missing)}")
        return {k: request.query[k] for k in keys}

    def body_length(request, limit: int, what: str) -> int:
        if request.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            raise LengthRequired(f"{what}: send the body with a Content-Length (no chunked encoding)")
        n = request.content_length
        if n is None:
            if request.body_exists:
                raise LengthRequired(f"{what}: send the body with a Content-Length")
            n = 0
        limit = min(limit, max_body)
        if n > limit:
            raise PayloadTooLarge(f"{what}: a body of {n} bytes; this request needs at most {limit}")
        return n

    async def read_exactly(request, n: int) -> bytes:
        # request.read() stops at the Content-Length checked above (and caches the body for other readers)
        try:
            body = await asyncio.wait_for(request.read(), timeout=cfg.body_timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the body did not arrive within {cfg.body_timeout_s:g} s") from None
        if len(body) != n:
            raise ProtocolError(f"the body ended after {len(body)} of its {n} bytes")
        return body

    async def run(request, key, fn):
        job = sched.submit(request.remote, key, fn)
        fut = asyncio.wrap_future(job.future)
        try:
            return await asyncio.wait_for(fut, timeout=cfg.queue_timeout_s + cfg.timeout_s + 5)
        except asyncio.TimeoutError:
            job.deadline.cancel("no answer in time")
            raise ServerBusy("the request could not be computed in time: retry later", retry_after=1) from None
        except asyncio.CancelledError:
            job.deadline.cancel("the client went away")
            raise

    def positive_int(text: str, name: str) -> int:
        if not (text.isascii() and text.isdigit() and len(text) <= 9):
            raise ProtocolError(f"query parameter {name} must be a positive integer, got {text[:40]!r}")
        return int(text)

    async def info(request):
        query(request, ())
        return web.json_response(service.info)

    async def client_model(request):
        query(request, ())
        return web.Response(body=service.client_model, content_type="application/octet-stream")

    async def open_session(request):
        q = query(request, ("mode", "prompt", "guidance", "steps"))
        mode = q.get("mode", "private")
        if mode == "private" and private is not None:
            if set(q) - {"mode"}:
                raise ProtocolError("private mode takes no prompt or guidance: the server never sees them")
            table = service.private.sessions
            build = service.private.new_session
        elif mode == "compat" and compat is not None:
            kwargs = compat.check_open_query({k: v for k, v in q.items() if k != "mode"})
            table = compat.sessions
            build = lambda body, d: compat.new_session(body, deadline=d, **kwargs)  # noqa: E731
        else:
            raise ProtocolError(f"mode must be one of {service.info['modes']}, got {mode[:40]!r}")
        n = body_length(
            request,
            open_limit,
            "a public context (parameters and at most a public key: no relinearisation or Galois keys)",
        )
        reservation = table.reserve(request.remote)
        try:
            async with budget.hold(2 * n + open_limit):
                body = await read_exactly(request, n)
                value = await run(request, ("open", mode), lambda d: build(body, d))
            token = table.fill(reservation, value)
        except BaseException:
            table.cancel(reservation)
            raise
        return web.json_response({"session": token, "mode": mode})

    async def linear(request):
        if private is None:
            raise ProtocolError("private mode is not served here (a pipeline: compat mode only)")
        q = query(request, ("layers", "positions"), ("layers", "positions"))
        names = tuple(q["layers"].split(","))
        positions = positive_int(q["positions"], "positions")
        with service.private.sessions.use(request.match_info["sid"], owner=request.remote) as s:
            p = s.context.params
            sizes = service.private.expected(names, positions, slots=p.slots)
            inflated = ciphertext_bytes(p.poly_modulus_degree, _data_primes(p))
            item = ciphertext_wire_max(inflated)
            n = body_length(request, 8 + len(sizes) * (4 + item), f"{len(sizes)} ciphertexts")
            async with budget.hold(2 * n + 2 * len(sizes) * inflated):
                frames = decode_frames(await read_exactly(request, n), count=len(sizes), max_item=item)
                out = await run(
                    request,
                    request.match_info["sid"],
                    lambda d: service.private.compute(s, names, positions, frames, d),
                )
        return web.Response(body=encode_frames(out), content_type="application/octet-stream")

    async def compat_step(request):
        if compat is None:
            raise ProtocolError("compat mode is not served here")
        key = compat.check_step(query(request, compat.STEP_PARAMS, compat.STEP_PARAMS))
        with compat.sessions.use(request.match_info["sid"], owner=request.remote) as s:
            p = s.context.params
            cts = -(-compat.n // p.slots)
            inflated = ciphertext_bytes(p.poly_modulus_degree, _data_primes(p))
            item = max(ciphertext_wire_max(inflated), 8 * compat.n)
            limit = 8 + 4 * (3 + cts) + 20 * compat.n + cts * ciphertext_wire_max(inflated)
            n = body_length(request, limit, "a compat step")
            async with budget.hold(2 * n + 2 * cts * inflated + 64 * compat.n):
                frames = decode_frames(await read_exactly(request, n), max_items=3 + cts, max_item=item)
                out = await run(request, request.match_info["sid"], lambda d: compat.compute(s, key, frames, d))
        return web.Response(body=encode_frames(out), content_type="application/octet-stream")

    async def close_session(request):
        query(request, ())
        sid = request.match_info["sid"]
        try:
            if private is None:
                raise SessionNotFound(f"unknown or expired session {sid[:16]!r}")
            private.close_session(sid, owner=request.remote)
        except SessionNotFound:
            if compat is None:
                raise
            compat.close_session(sid, owner=request.remote)
        return web.Response(status=204)

    async def shutdown(app):
        sched.shutdown()

    app = web.Application(client_max_size=max_body, middlewares=[errors])
    app.router.add_get("/v1/info", info)
    app.router.add_get("/v1/client-model", client_model)
    app.router.add_post("/v1/sessions", open_session)
    app.router.add_post("/v1/sessions/{sid}/linear", linear)
    app.router.add_post("/v1/sessions/{sid}/compat-step", compat_step)
    app.router.add_delete("/v1/sessions/{sid}", close_session)
    app.on_shutdown.append(shutdown)
    app[SCHEDULER] = sched
    return app


def serve(
    run: str | Path | None = None,
    *,
    pipeline: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8750,
    config: ServiceConfig = ServiceConfig(),
) -> None:
    """Run the service of ``run``, or of the Stable-Diffusion-style ``pipeline`` directory (compat mode), until
    interrupted (``port`` 0: a free port, printed)."""
    from aiohttp import web

    if (run is None) == (pipeline is None):
        raise ValueError("serve a run directory or a pipeline (--pipeline DIR), one of the two")
    server_allocator()
    service = load_service(run, config=config) if pipeline is None else load_pipeline_service(pipeline, config=config)
    trim_memory()

    async def main():
        runner = web.AppRunner(build_app(service), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        print(
            f"privdiff he: serving {run or pipeline} on http://{host}:{bound} (modes: {', '.join(service.info['modes'])})",
            flush=True,
        )
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())
