"""A tiny HE run directory made in seconds (no training: fresh random weights in the run layout), and an
aiohttp server on 127.0.0.1 in a background thread that records every request and answer."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

NAMES = tuple(str(d) for d in range(10))
TINY_HE = [
    "data.resolution=16",
    "ldm.autoencoder.channels=[8,16]",
    "ldm.autoencoder.norm_num_groups=4",
    "ldm.he.width=32",
    "ldm.he.blocks=1",
    "ldm.he.heads=2",
    "ldm.he.head_dim=8",
    "ldm.he.fourier=4",
    "ldm.text.width=16",
    "ldm.text.layers=1",
    "ldm.text.heads=2",
    "sampler.steps=2",
]


def make_he_run(path, seed: int = 0):
    """RUN with config.yaml, an EMA checkpoint of a random HE-friendly denoiser and a random autoencoder."""
    from privdiff.cli import _recipe_path
    from privdiff.config import resolve_recipe
    from privdiff.models.he_net import build_he_net
    from privdiff.models.autoencoder import build_autoencoder
    from privdiff.models.text import build_text_encoder
    from privdiff.runs import TrainingState, open_run

    recipe = resolve_recipe(_recipe_path("he-ldm-mnist5k"), TINY_HE)
    run = open_run(path, recipe)
    torch.manual_seed(seed)
    te = build_text_encoder(recipe.ldm.text, class_names=(NAMES,))
    net = build_he_net(recipe.ldm.he, te, latent_channels=4, latent_size=8, num_classes=10).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    run.save_checkpoint(
        TrainingState(step=1, unet=net, unet_ema=net, optimizer={}, rng={"x": torch.zeros(1, dtype=torch.uint8)})
    )
    ae = build_autoencoder(recipe.ldm.autoencoder, in_channels=1, resolution=16)
    ae.register_to_config(scaling_factor=1.5)
    ae.save_pretrained(run.path / "autoencoder", safe_serialization=True)
    return run


@pytest.fixture(scope="session")
def he_run(tmp_path_factory):
    return make_he_run(tmp_path_factory.mktemp("he") / "run")


class BackgroundServer:
    """``build_app(service)`` served on 127.0.0.1 (a free port) from a thread; ``wire`` records
    (method, path with query, request body, answer body) of every request."""

    def __init__(self, service):
        from aiohttp import web

        from privdiff.he.server import build_app

        self.wire: list[tuple[str, str, bytes, bytes]] = []
        self.service = service

        @web.middleware
        async def capture(request, handler):
            body, answer = b"", b""
            try:
                body = await request.read()
                resp = await handler(request)
                answer = resp.body if isinstance(resp.body, (bytes, bytearray)) else b""
                return resp
            finally:
                self.wire.append((request.method, request.path_qs, bytes(body), bytes(answer)))

        app = self.app = build_app(service)
        app.middlewares.append(capture)
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(he_run):
    from privdiff.he.server import ServiceConfig, load_service

    srv = BackgroundServer(load_service(he_run.path, config=ServiceConfig(max_body_mb=8, timeout_s=60)))
    yield srv
    srv.close()
