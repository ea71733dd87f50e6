"""The client of the encrypted-inference service: ``privdiff he generate --server URL --prompt TEXT``.

The client holds the only secret key. In private mode it tokenises and encodes the prompt itself
(the server's text encoder and class embedder are downloaded once, with the autoencoder that decodes
the image on the client), runs the sampler, and sends the server nothing but a public CKKS context
and ciphertexts. In compat mode it follows HE-Diffusion's data flow (see :mod:`privdiff.he.compat`); against
a Stable-Diffusion-style pipeline (``privdiff he serve --pipeline DIR``) that is the only mode, with PLMS
updates, and the client decodes the final latent with the pipeline's VAE decoder (``/v1/client-model``).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .ckks import PRESETS, TenSEALContext
from .server import decode_frames, encode_frames

__all__ = ["HTTPClient", "GenerateResult", "generate", "ServiceError"]


class ServiceError(OSError):
    """The server refused a request or could not be reached."""


class _Retry(Exception):
    def __init__(self, code: int, detail: str, after: float):
        self.code, self.detail, self.after = code, detail, after


@dataclass
class GenerateResult:
    image: np.ndarray  # [1, C, H, W] in [0, 1]
    mode: str
    seconds: float
    evaluations: int  # denoiser evaluations (= encrypted forward passes or compat steps)
    rounds: int  # HTTP round trips with ciphertexts
    bytes_up: int
    bytes_down: int
    per_eval: list[float] = field(default_factory=list)
    latents: list[np.ndarray] = field(default_factory=list)  # compat: the decrypted latent after each step
    pipeline: bool = False  # from a Stable-Diffusion pipeline's server

    def save(self, path: str | Path) -> Path:
        """Write the image as PNG, atomically: a pipeline's image as the pipeline writes it (H×W pixels,
        ``round(255·x)``), a run's as ``privdiff sample --n 1`` does (its one-image grid)."""
        from ..atomic import atomic_write_bytes
        from ..runs import save_grid

        if not self.pipeline:
            return save_grid(path, self.image, nrow=1)
        import io

        from PIL import Image

        arr = (self.image[0].clip(0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
        png = io.BytesIO()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(png, format="PNG")
        atomic_write_bytes(path, png.getvalue())
        return Path(path)


class HTTPClient:
    """Requests to one server (stdlib ``urllib``), counting the bytes of every body both ways.

    A 429 or 503 answer with a ``Retry-After`` header (a limit of the server that frees up: its
    session table, its queue, the memory it gives requests) is retried after that many seconds,
    for up to ``timeout`` seconds of waiting per request; every request of the protocol can be
    repeated without effect (a refused one changed nothing on the server)."""

    def __init__(self, url: str, *, timeout: float = 300.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        self.bytes_up = self.bytes_down = 0
        self.retries = 0

    def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        import random

        waited = 0.0
        while True:
            try:
                return self._once(method, path, body)
            except _Retry as r:
                pause = r.after + random.uniform(0.0, 0.5)
                if waited + pause > self.timeout:
                    raise ServiceError(
                        f"server answered {r.code}: {r.detail} (still after {waited:.0f} s of retries)"
                    ) from None
                time.sleep(pause)
                waited += pause
                self.retries += 1

    def _once(self, method: str, path: str, body: bytes | None) -> bytes:
        req = urllib.request.Request(
            self.url + path,
            data=body,
            method=method,
            headers={"Content-Type": "application/octet-stream"} if body is not None else {},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                data = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                detail = json.loads(detail)["error"]
            except (ValueError, KeyError, TypeError):
                pass
            after = e.headers.get("Retry-After", "") if e.headers is not None else ""
            if e.code in (429, 503) and after.isdigit():
                raise _Retry(e.code, str(detail), float(after)) from None
            raise ServiceError(f"server answered {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise ServiceError(f"cannot reach {self.url}: {getattr(e, 'reason', e)}") from None
        self.bytes_up += len(body or b"")
        self.bytes_down += len(data)
        return data

    def json(self, method: str, path: str, body: bytes | None = None) -> dict:
        return json.loads(self.request(method, path, body))


def _client_parts(blob: bytes):
    """Class embedder + text encoder (an :class:`~privdiff.models.he_net.HENet` shell) and the decoder from /v1/client-model."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load

    from ..models.text import TextConfig, TextEncoder, WordTokenizer
    from ..models.he_net import HENet

    state = load(blob)
    meta = _metadata(blob)
    text = TextConfig(**json.loads(meta["text"]))
    encoder = TextEncoder(WordTokenizer.from_dict(json.loads(meta["tokenizer"])), text)
    shell = HENet(torch.nn.Identity(), torch.nn.Embedding(int(meta["num_classes"]) + 1, text.width), encoder)
    shell.class_embedder.load_state_dict(
        {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("class_embedder.")}
    )
    shell.text_encoder.load_state_dict(
        {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("text_encoder.")}
    )
    cfg = {k: v for k, v in json.loads(meta["autoencoder"]).items() if not k.startswith("_")}
    ae = AutoencoderKL(**cfg)
    ae.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("autoencoder.")})
    ae.eval().requires_grad_(False)
    return shell.eval(), (lambda z: ae.decode(z / ae.config.scaling_factor).sample)


def _pipeline_decoder(blob: bytes):
    """z ↦ the pipeline's VAE decoding of a latent (the pipeline's own ``vae.decode(z / scaling_factor)``), from
    the server's ``/v1/client-model`` (:func:`privdiff.he.server.decoder_bytes`)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load

    meta = _metadata(blob)
    if meta.get("kind") != "pipeline-vae":
        raise ServiceError("the server's client model is not a pipeline's VAE decoder")
    vae = AutoencoderKL(**json.loads(meta["vae"]))
    missing, unexpected = vae.load_state_dict(load(blob), strict=False)
    if unexpected or any(not k.startswith(("encoder.", "quant_conv.")) for k in missing):
        raise ServiceError("the server's VAE decoder does not match its config")
    vae.eval().requires_grad_(False)
    return lambda z: vae.decode(z / vae.config.scaling_factor).sample


def _metadata(blob: bytes) -> dict:
    import tempfile

    from safetensors import safe_open

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:  # the metadata needs a file
        f.write(blob)
        f.flush()
        with safe_open(f.name, "pt") as sf:
            return sf.metadata() or {}


def generate(
    url: str,
    prompt: str,
    *,
    mode: str = "private",
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    params: str = "precise",
    progress: bool = True,
    timeout: float = 300.0,
    context: TenSEALContext | None = None,
) -> GenerateResult:
    """One image for ``prompt`` from the server at ``url``: the same image as plaintext sampling of the
    served run with the same seed, steps and guidance (up to CKKS rounding)."""
    from ..config import resolve_recipe
    from ..diffusion import Denoiser
    from ..core.generation import generate as sample_images
    from .private import client_net

    if mode not in ("private", "compat"):
        raise ValueError(f"mode must be 'private' or 'compat', got {mode!r}")
    http = HTTPClient(url, timeout=timeout)
    info = http.json("GET", "/v1/info")
    if info.get("kind") == "pipeline":
        if mode != "compat":
            raise ValueError(
                "this server serves a Stable-Diffusion pipeline in compat mode only (--mode compat); "
                "private mode needs an HE-friendly denoiser (docs/he.md)"
            )
        return _generate_pipeline(
            http,
            info,
            prompt,
            seed=seed,
            steps=steps,
            guidance=guidance,
            params=params,
            progress=progress,
            context=context,
        )
    overrides = [f"sampler.{k}={v}" for k, v in (("steps", steps), ("guidance", guidance)) if v is not None]
    recipe = resolve_recipe({"sampler": info["sampler"], "diffusion": info["diffusion"]}, overrides)
    shell, decode = _client_parts(http.request("GET", "/v1/client-model"))
    ctx = context or TenSEALContext.generate(PRESETS[params])
    s = recipe.sampler
    evals = s.steps if s.name in ("euler", "ddim") or mode == "compat" else 2 * s.steps - 1
    bar = tqdm(
        total=evals, desc=f"{mode} denoising", unit="eval", disable=not progress, file=sys.stderr, dynamic_ncols=True
    )
    t0 = time.perf_counter()
    if mode == "compat":
        result = _generate_compat(http, ctx, recipe, shell, decode, prompt, seed=seed, bar=bar)
    else:
        sid = http.json("POST", "/v1/sessions?mode=private", ctx.public_bytes())["session"]
        rounds = [0]

        def send(names, positions, cts):
            rounds[0] += 1
            return decode_frames(
                http.request(
                    "POST",
                    f"/v1/sessions/{sid}/linear?layers={','.join(names)}&positions={positions}",
                    encode_frames(cts),
                )
            )

        net = client_net(info["model"], shell, ctx, send)
        times, last = [], [time.perf_counter()]
        core_forward = net.unet.forward

        def counted(*a):
            out = core_forward(*a)
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now
            bar.update(1)
            return out

        net.unet.forward = counted
        try:
            den = Denoiser(
                net, sigma_data=recipe.diffusion.sigma_data, parameterization=recipe.diffusion.parameterization
            )
            image = sample_images(
                den, labels=None, n=1, recipe=recipe, prompts=[prompt], decode=decode, seed=seed, progress=False
            )
        finally:
            try:
                http.request("DELETE", f"/v1/sessions/{sid}")
            except ServiceError:
                pass
        result = GenerateResult(image, "private", 0.0, len(times), rounds[0], 0, 0, times)
    bar.close()
    result.seconds = time.perf_counter() - t0
    result.bytes_up, result.bytes_down = http.bytes_up, http.bytes_down
    return result


@torch.no_grad()
def _generate_pipeline(
    http: HTTPClient,
    info: dict,
    prompt: str,
    *,
    seed: int,
    steps: int | None,
    guidance: float | None,
    params: str,
    progress: bool,
    context: TenSEALContext | None,
) -> GenerateResult:
    """HE-Diffusion on a pipeline: x_T drawn here (as the pipeline draws it), then one round trip per PLMS update
    (select, pack, encrypt; the server runs the UNet on the plaintext x_t and updates the ciphertexts; decrypt,
    merge), and the pipeline's VAE decoder on the final latent."""
    steps = int(info["sampler"]["steps"] if steps is None else steps)
    guidance = float(info["sampler"]["guidance"] if guidance is None else guidance)
    decode = _pipeline_decoder(http.request("GET", "/v1/client-model"))
    ctx = context or TenSEALContext.generate(PRESETS[params])
    shape = (1, *info["model"]["latent_shape"])
    bar = tqdm(total=steps, desc="compat PLMS", unit="step", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    # x_T ~ N(0, I): PLMS's initial noise (init_noise_sigma = 1), drawn once, from the seed
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    session = {"prompt": prompt, "guidance": guidance, "steps": steps}
    result = _compat_loop(http, ctx, x, session, [f"step={i}" for i in range(steps)], bar=bar)
    bar.close()
    result.image = ((decode(torch.from_numpy(result.latents[-1]).float()).clamp(-1, 1) + 1) / 2).float().numpy()
    result.pipeline = True
    result.seconds = time.perf_counter() - t0
    result.bytes_up, result.bytes_down = http.bytes_up, http.bytes_down
    return result


def _compat_loop(
    http: HTTPClient, ctx: TenSEALContext, x: torch.Tensor, session: dict, steps: list[str], *, bar
) -> GenerateResult:
    """HE-Diffusion's per-step loop from x_T = ``x``: select → pack → encrypt → server update (the step's query
    in ``steps``) → decrypt → merge. The latent, the prompt and the remainder go to the server in plaintext.
    Returns the decrypted latent after each step (``latents``), no image."""
    import urllib.parse

    from .compat import coo_pack, encrypt_packed, merge, select_encrypted

    q = urllib.parse.urlencode({"mode": "compat", **session})
    sid = http.json("POST", f"/v1/sessions?{q}", ctx.public_bytes())["session"]
    shape = tuple(x.shape)
    times, latents = [], []
    try:
        for step in steps:
            t = time.perf_counter()
            mask = select_encrypted(x)
            idx, values, rem = coo_pack(x, mask)
            cts = [c.serialize() for c in encrypt_packed(ctx, values)]
            frames = [x.float().numpy().tobytes(), idx.astype(np.int64).tobytes(), rem.tobytes()] + cts
            out = decode_frames(http.request("POST", f"/v1/sessions/{sid}/compat-step?{step}", encode_frames(frames)))
            r_new = np.frombuffer(out[0], dtype=np.float64)
            dec = (
                np.concatenate([ctx.decrypt(ctx.ciphertext_from_bytes(c)) for c in out[1:]])
                if len(out) > 1
                else np.zeros(0)
            )
            merged = merge(r_new, idx, dec).reshape(shape)
            latents.append(merged)
            x = torch.from_numpy(merged).float()
            times.append(time.perf_counter() - t)
            bar.update(1)
    finally:
        try:
            http.request("DELETE", f"/v1/sessions/{sid}")
        except ServiceError:
            pass
    return GenerateResult(np.zeros(0), "compat", 0.0, len(times), len(times), 0, 0, times, latents)


@torch.no_grad()
def _generate_compat(
    http: HTTPClient, ctx: TenSEALContext, recipe, shell, decode, prompt: str, *, seed: int, bar
) -> GenerateResult:
    """HE-Diffusion's loop with the served model: DDIM (Euler) steps, select → pack → encrypt → server
    update → decrypt → merge. The latent, the prompt and the remainder go to the server in plaintext."""
    from ..diffusion import karras_sigmas

    s = recipe.sampler
    info = http.json("GET", "/v1/info")
    shape = (1, *info["model"]["latent_shape"])
    sigmas = karras_sigmas(s.steps, sigma_min=s.sigma_min, sigma_max=s.sigma_max, rho=s.rho).tolist()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * sigmas[0]  # x_T, drawn once (the reference's --fixed_code)
    steps = [f"sigma={sigmas[i]!r}&sigma_next={sigmas[i + 1]!r}" for i in range(len(sigmas) - 1)]
    result = _compat_loop(http, ctx, x, {"prompt": prompt, "guidance": s.guidance}, steps, bar=bar)
    x = torch.from_numpy(result.latents[-1]).float()
    result.image = ((decode(x).clamp(-1, 1) + 1) / 2).float().numpy()
    return result
