"""The encrypted-inference HTTP service (aiohttp): ``privdiff he serve RUN``.

Routes (all under ``/v1``; errors are JSON ``{"error": ...}`` with a 4xx status):

| route | body | answer |
|---|---|---|
| ``GET /v1/info`` | — | modes, the network's layer sizes (no weights), sampler and diffusion settings, limits |
| ``GET /v1/client-model`` | — | safetensors: the client's part (class embedder, text encoder, autoencoder), trained on public data or released with DP |
| ``POST /v1/sessions?mode=private`` | a public CKKS context | ``{"session": id}``; a context with a secret key is refused |
| ``POST /v1/sessions/{id}/linear?layers=a,b&positions=P`` | framed ciphertexts | framed ciphertexts (private mode) |
| ``POST /v1/sessions/{id}/compat-step?...`` | framed ciphertexts + plaintext parts | compat mode (HE-Diffusion) |
| ``DELETE /v1/sessions/{id}`` | — | 204 |

Ciphertext frames: ``b"PDCT"``, a little-endian u32 count, then per ciphertext a u32 length and its bytes.
Every computation runs in a worker thread under a timeout, so the server keeps answering other clients.
"""

from __future__ import annotations

import asyncio
import json
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .ckks import CKKSError
from .private import PrivateServer, ProtocolError

__all__ = ["ServiceConfig", "build_app", "encode_frames", "decode_frames", "client_model_bytes", "load_service"]

MAGIC = b"PDCT"


@dataclass(frozen=True)
class ServiceConfig:
    max_body_mb: float = 64.0  # larger requests get 413
    timeout_s: float = 120.0  # a request that computes longer gets 503
    workers: int = 2  # threads doing HE work
    max_sessions: int = 16
    session_ttl_s: float = 600.0


def encode_frames(items: list[bytes]) -> bytes:
    """b"PDCT" + u32 count + (u32 length + bytes)* (little-endian)."""
    out = [MAGIC, struct.pack("<I", len(items))]
    for b in items:
        out += [struct.pack("<I", len(b)), b]
    return b"".join(out)


def decode_frames(data: bytes, *, max_items: int = 100_000) -> list[bytes]:
    """Inverse of :func:`encode_frames`; :class:`ProtocolError` for anything malformed or truncated."""
    if len(data) < 8 or data[:4] != MAGIC:
        raise ProtocolError("body is not a ciphertext frame (expected magic PDCT)")
    (n,) = struct.unpack_from("<I", data, 4)
    if n > max_items:
        raise ProtocolError(f"{n} ciphertexts in one request (at most {max_items})")
    items, off = [], 8
    for i in range(n):
        if off + 4 > len(data):
            raise ProtocolError(f"frame truncated at ciphertext {i} of {n}")
        (m,) = struct.unpack_from("<I", data, off)
        off += 4
        if off + m > len(data):
            raise ProtocolError(f"frame truncated inside ciphertext {i} of {n}")
        items.append(data[off:off + m])
        off += m
    if off != len(data):
        raise ProtocolError(f"{len(data) - off} trailing bytes after {n} ciphertexts")
    return items


def client_model_bytes(net, autoencoder) -> bytes:
    """The client's part as one safetensors file: class embedder, text encoder (the prompt is encoded
    on the client) and the autoencoder (the image is decoded on the client); configs in its metadata."""
    import dataclasses

    from safetensors.torch import save

    state = {f"class_embedder.{k}": v for k, v in net.class_embedder.state_dict().items()}
    state |= {f"text_encoder.{k}": v for k, v in net.text_encoder.state_dict().items()}
    state |= {f"autoencoder.{k}": v for k, v in autoencoder.state_dict().items()}
    meta = {"num_classes": str(net.num_classes), "text": json.dumps(dataclasses.asdict(net.text_encoder.config)),
            "tokenizer": json.dumps(net.text_encoder.tokenizer.to_dict()), "autoencoder": json.dumps({k: v for k, v in dict(autoencoder.config).items() if not k.startswith("_")})}
    return save({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=meta)


@dataclass
class Service:
    private: PrivateServer
    info: dict
    client_model: bytes
    config: ServiceConfig
    compat: object | None = None  # privdiff.he.compat.CompatServer


def load_service(run: str | Path, *, config: ServiceConfig = ServiceConfig(), permute: bool = True) -> Service:
    """The service of a run trained with ``ldm.net: he`` (its EMA denoiser, sampler settings and autoencoder)."""
    from ..config import recipe_to_dict
    from ..methods.stages import make_denoiser
    from ..runs import Run, RunError
    from .compat import CompatServer
    from ..models.he_net import HENet

    r = Run(run)
    recipe = r.load_config()
    net = r.load_net(ema=True).eval()
    if not isinstance(net, HENet):
        raise RunError(f"{r.path}: its denoiser is not the HE-friendly one (train with ldm.net=he, e.g. the he-ldm-mnist5k recipe)")
    ae_dir = r.path / "autoencoder"
    if not (ae_dir / "config.json").is_file():
        raise RunError(f"{r.path}: no autoencoder/ (not a latent-diffusion run)")
    from diffusers import AutoencoderKL

    ae = AutoencoderKL.from_pretrained(ae_dir, local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False).eval()
    private = PrivateServer(net.unet, permute=permute, max_sessions=config.max_sessions, session_ttl=config.session_ttl_s)
    d = recipe_to_dict(recipe)
    info = {"modes": ["private", "compat"], "model": private.spec(), "sampler": d["sampler"], "diffusion": d["diffusion"],
            "limits": {"max_body_bytes": int(config.max_body_mb * 2**20), "timeout_s": config.timeout_s,
                       "max_positions": private.max_positions}}
    return Service(private, info, client_model_bytes(net, ae), config,
                   CompatServer(make_denoiser(recipe, net), max_sessions=config.max_sessions, session_ttl=config.session_ttl_s))


def build_app(service: Service):
    """The aiohttp application of ``service`` (see the module docstring for the routes)."""
    from aiohttp import web

    executor = ThreadPoolExecutor(max_workers=service.config.workers, thread_name_prefix="privdiff-he")

    def error(status: int, message: str):
        return web.json_response({"error": message}, status=status)

    @web.middleware
    async def errors(request, handler):
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status == 413:
                return error(413, f"request body larger than {service.config.max_body_mb:g} MB")
            raise
        except (ProtocolError, CKKSError) as e:
            status = 404 if "unknown or expired session" in str(e) else 400
            return error(status, str(e))
        except asyncio.TimeoutError:
            return error(503, f"computation took longer than {service.config.timeout_s:g} s")

    async def compute(fn, *args):
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(executor, fn, *args), timeout=service.config.timeout_s)

    def int_param(request, name: str) -> int:
        try:
            return int(request.query[name])
        except (KeyError, ValueError):
            raise ProtocolError(f"query parameter {name} must be an integer") from None

    async def info(request):
        return web.json_response(service.info)

    async def client_model(request):
        return web.Response(body=service.client_model, content_type="application/octet-stream")

    async def open_session(request):
        mode = request.query.get("mode", "private")
        body = await request.read()
        if mode == "private":
            sid = await compute(service.private.open_session, body)
        elif mode == "compat" and service.compat is not None:
            try:
                guidance = float(request.query.get("guidance", 0.0))
            except ValueError:
                raise ProtocolError("guidance must be a number") from None
            sid = await compute(service.compat.open_session, body, request.query.get("prompt", ""), guidance)
        else:
            raise ProtocolError(f"mode must be one of {service.info['modes']}, got {mode!r}")
        return web.json_response({"session": sid, "mode": mode})

    async def linear(request):
        names = tuple(n for n in request.query.get("layers", "").split(",") if n)
        positions = int_param(request, "positions")
        cts = decode_frames(await request.read())
        out = await compute(service.private.linear, request.match_info["sid"], names, positions, cts)
        return web.Response(body=encode_frames(out), content_type="application/octet-stream")

    async def compat_step(request):
        if service.compat is None:
            raise ProtocolError("compat mode is not served here")
        frames = decode_frames(await request.read())
        out = await compute(service.compat.step, request.match_info["sid"], dict(request.query), frames)
        return web.Response(body=encode_frames(out), content_type="application/octet-stream")

    async def close_session(request):
        service.private.close_session(request.match_info["sid"])
        if service.compat is not None:
            service.compat.close_session(request.match_info["sid"])
        return web.Response(status=204)

    async def shutdown(app):
        executor.shutdown(wait=False, cancel_futures=True)

    app = web.Application(client_max_size=int(service.config.max_body_mb * 2**20), middlewares=[errors])
    app.router.add_get("/v1/info", info)
    app.router.add_get("/v1/client-model", client_model)
    app.router.add_post("/v1/sessions", open_session)
    app.router.add_post("/v1/sessions/{sid}/linear", linear)
    app.router.add_post("/v1/sessions/{sid}/compat-step", compat_step)
    app.router.add_delete("/v1/sessions/{sid}", close_session)
    app.on_shutdown.append(shutdown)
    return app


def serve(run: str | Path, *, host: str = "127.0.0.1", port: int = 8750, config: ServiceConfig = ServiceConfig()) -> None:
    """Run the service of ``run`` until interrupted."""
    from aiohttp import web

    service = load_service(run, config=config)
    print(f"privdiff he: serving {run} on http://{host}:{port} (modes: {', '.join(service.info['modes'])})", flush=True)
    web.run_app(build_app(service), host=host, port=port, print=None)


