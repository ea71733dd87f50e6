"""The HTTP service on loopback: a private-mode image equals plaintext sampling, nothing readable
crosses the wire, bad requests get 4xx while the server keeps serving, concurrent clients complete.
CKKS: the service's "precise" preset (what is tested here is the protocol, on a tiny model)."""

from __future__ import annotations

import json
import struct
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tenseal")
pytest.importorskip("aiohttp")

from privdiff.he.ckks import PRESETS, TenSEALContext  # noqa: E402
from privdiff.he.client import generate  # noqa: E402
from privdiff.he.server import encode_frames  # noqa: E402

from .hostile import plaintext_image, psnr  # noqa: E402

PROMPT = "a handwritten digit three"


def post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}") if r.headers.get("Content-Type", "").startswith(
                "application/json"
            ) else {}
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, {"error": text.decode(errors="replace")}


def test_private_generation_matches_plaintext_and_the_wire_carries_nothing_readable(he_run, server):
    ctx = TenSEALContext.generate(PRESETS["precise"])
    start = len(server.wire)
    result = generate(server.url, PROMPT, seed=3, steps=1, progress=False, context=ctx)
    ref, den = plaintext_image(he_run, seed=3, steps=1)
    assert (
        result.evaluations == 1 and result.rounds == 7
    )  # the prompt's keys and values, then in, q, o, fc1, fc2, out (one block)
    assert psnr(result.image, ref) >= 40.0
    wire = server.wire[start:]
    up = b"".join(path.encode() + body for _, path, body, _ in wire)  # everything the server received
    # no secret key: the session's context is public, and no piece of the saved secret key was sent
    import tempfile

    import tenseal as ts

    opened = [body for m, path, body, _ in wire if path.startswith("/v1/sessions?")]
    assert len(opened) == 1 and not ts.context_from(opened[0]).has_secret_key()
    with tempfile.NamedTemporaryFile() as f:
        ctx._ctx.secret_key().data.save(f.name)
        sk = Path(f.name).read_bytes()
    assert all(sk[i : i + 32] not in up for i in range(0, len(sk) - 32, len(sk) // 16))
    # no prompt: neither its text nor any of its words, in bodies or URLs
    for word in (PROMPT, "three", "handwritten"):
        assert word.encode() not in up and word.encode("utf-16-le") not in up
    # no plaintext latent, embedding or network input: none of their values as float32 pairs or float64
    net = den.net
    cond = net.conditions(prompts=[PROMPT], n=1)
    with torch.no_grad():
        embedding = net.context(cond).reshape(-1).double().numpy()
    g = torch.Generator().manual_seed(3)
    x_T = (torch.randn((1, *net.sample_shape), generator=g) * 80.0).reshape(-1).double().numpy()
    x_in = x_T / np.sqrt(80.0**2 + 1.0)  # c_in·x_T, what the first layer reads
    for values in (embedding, x_T, x_in):
        for v in values[:64]:
            assert np.float64(v).tobytes() not in up
        f32 = values.astype(np.float32)
        for i in range(0, min(len(f32) - 1, 64)):
            assert f32[i : i + 2].tobytes() not in up
    # the session was closed at the end
    assert wire[-1][0] == "DELETE"


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server):
    from privdiff.he.private import pack_inputs

    url = server.url
    ctx = TenSEALContext.generate(PRESETS["precise"])
    status, body = post(url + "/v1/sessions?mode=private", ctx.public_bytes())
    assert status == 200
    sid = body["session"]
    assert all(not s.context.has_secret_key for s in server.service.private.sessions.values())
    info = json.loads(urllib.request.urlopen(url + "/v1/info", timeout=10).read())
    n_out, n_in = info["model"]["layers"]["q0"]
    good = [
        ctx.encrypt(v).serialize()
        for v in pack_inputs(np.random.default_rng(0).standard_normal((2, n_in)), n_out, 4096)
    ]
    lin = f"{url}/v1/sessions/{sid}/linear?layers=q0&positions=2"
    other = TenSEALContext.generate(PRESETS["small"]).encrypt(np.ones(8)).serialize()
    cases = {
        "garbage": (lin, b"hello"),
        "truncated frame": (lin, encode_frames(good)[:-100]),
        "truncated ciphertext": (lin, encode_frames([good[0][: len(good[0]) // 2]] + good[1:])),
        "wrong count": (lin, encode_frames(good[:-1])),
        "wrong-context ciphertext": (lin, encode_frames([other] + good[1:])),
        "unknown layer": (f"{url}/v1/sessions/{sid}/linear?layers=nope&positions=2", encode_frames(good)),
        "bad positions": (f"{url}/v1/sessions/{sid}/linear?layers=q0&positions=x", encode_frames(good)),
        "secret key in context": (url + "/v1/sessions?mode=private", ctx._ctx.serialize(save_secret_key=True)),
        "wrong parameters": (
            url + "/v1/sessions?mode=private",
            TenSEALContext.generate(PRESETS["small"]).public_bytes(),
        ),
        "bad mode": (url + "/v1/sessions?mode=nope", ctx.public_bytes()),
        "unknown session": (f"{url}/v1/sessions/{'0' * 32}/linear?layers=q0&positions=2", encode_frames(good)),
        "oversized": (lin, encode_frames([b"\0" * (9 << 20)])),
    }
    for name, (u, body) in cases.items():
        status, answer = post(u, body)
        assert 400 <= status < 500, (name, status, answer)
        assert answer.get("error"), name
        assert status == (413 if name == "oversized" else 404 if name == "unknown session" else 400), (
            name,
            status,
            answer,
        )
    # the session is intact and the server still computes a correct layer
    req = urllib.request.Request(lin, data=encode_frames(good), method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200 and r.read()[:4] == b"PDCT"
    assert struct.unpack("<I", encode_frames(good)[4:8])[0] == len(good)


def test_concurrent_clients_all_complete(server):
    results, errors = [], []

    def one(seed):
        try:
            results.append(generate(server.url, PROMPT, seed=seed, steps=1, progress=False))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 3
    assert len({r.image.tobytes() for r in results}) == 3  # three seeds, three images


def test_compat_mode_is_the_plaintext_ddim_update(he_run, server):
    """HE-Diffusion's loop (select, COO, encrypted update, merge) reproduces plaintext DDIM (Euler)."""
    result = generate(server.url, PROMPT, mode="compat", seed=5, steps=3, progress=False)
    ref, _ = plaintext_image(he_run, seed=5, steps=3, sampler="euler")
    assert result.evaluations == 3
    assert psnr(result.image, ref) >= 40.0


@pytest.mark.slow
def test_cli_generate_equals_cli_sample(he_run, server, tmp_path, capsys):
    """`privdiff he generate` against the server writes the PNG that `privdiff sample` writes in plaintext;
    an unreachable server is a one-line error, exit 2, and no file."""
    from PIL import Image

    from privdiff.cli import main

    out, plain = tmp_path / "three.png", tmp_path / "plain.png"
    assert (
        main(
            ["he", "generate", "--server", server.url, "--prompt", PROMPT, "--out", str(out), "--steps", "2", "--quiet"]
        )
        == 0
    )
    assert "private mode, 3 denoiser evaluations" in capsys.readouterr().out
    assert (
        main(
            ["sample", str(he_run.path), "--n", "1", "--prompt", PROMPT, "--steps", "2", "--out", str(plain), "--quiet"]
        )
        == 0
    )
    a, b = (np.asarray(Image.open(p), dtype=np.float64) / 255 for p in (out, plain))
    assert psnr(a, b) >= 40.0
    capsys.readouterr()
    assert (
        main(
            [
                "he",
                "generate",
                "--server",
                "http://127.0.0.1:9",
                "--prompt",
                PROMPT,
                "--out",
                str(tmp_path / "x.png"),
                "--quiet",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "cannot reach" in err and err.count("\n") == 1 and not (tmp_path / "x.png").exists()


def test_a_request_past_its_timeout_stops_computing_and_frees_the_worker(he_run):
    """With a timeout (1 ms) shorter than the largest request the protocol allows, that request is answered
    503 at once and its worker is free again (the work stopped at its next check, not at its end); a
    Deadline already past stops the work before its first ciphertext is even loaded."""
    import time

    from privdiff.he.private import pack_inputs
    from privdiff.he.protocol import Cancelled, Deadline
    from privdiff.he.server import ServiceConfig, load_service

    from .conftest import BackgroundServer

    srv = BackgroundServer(load_service(he_run.path, config=ServiceConfig(timeout_s=0.001, workers=1)))
    try:
        ctx = TenSEALContext.generate(PRESETS["precise"])
        status, body = post(srv.url + "/v1/sessions?mode=private", ctx.public_bytes())
        assert status == 503 and "stopped" in body["error"]  # even opening a session takes longer than 1 ms
        sid = srv.service.private.open_session(ctx.public_bytes(), owner="127.0.0.1")  # so open it in process
        info = json.loads(urllib.request.urlopen(srv.url + "/v1/info", timeout=10).read())
        T, layers = info["limits"]["context_tokens"], "k0,v0"
        n_out, n_in = 2 * info["model"]["layers"]["k0"][0], info["model"]["layers"]["k0"][1]
        X = np.random.default_rng(0).standard_normal((2 * T, n_in))
        cts = [ctx.encrypt(v).serialize() for v in pack_inputs(X, n_out, 4096)]
        t0 = time.monotonic()
        status, answer = post(
            f"{srv.url}/v1/sessions/{sid}/linear?layers={layers}&positions={2 * T}", encode_frames(cts)
        )
        took = time.monotonic() - t0
        assert status == 503 and "stopped" in answer["error"], (status, answer)
        from privdiff.he.server import SCHEDULER

        sched = srv.app[SCHEDULER]
        for _ in range(100):  # the worker's bookkeeping follows the answer by microseconds
            if sched.busy() == (0, 0):
                break
            time.sleep(0.01)
        assert sched.busy() == (0, 0) and took < 5.0
        # the same work, in process: a deadline already past stops it before the first ciphertext
        session = srv.service.private.sessions.get(sid, owner="127.0.0.1")
        d = Deadline(0.0)
        d.start()
        time.sleep(0.01)
        with pytest.raises(Cancelled):
            srv.service.private.compute(session, ("k0", "v0"), 2 * T, cts, d)
    finally:
        srv.close()
