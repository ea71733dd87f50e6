"""Compat mode (HE-Diffusion as published) on a Stable-Diffusion-style pipeline: PLMS as an affine map of x_t
equals diffusers' PNDMScheduler; over HTTP on loopback, the decrypted trajectory and the decoded image equal
plaintext PLMS sampling (privdiff's scheduler loop and StableDiffusionPipeline with PNDMScheduler) for the
same x_T, prompt and guidance; bad input is refused in one line.

Stated CKKS tolerance (max absolute error on latents and on images in [0, 1]; the random tiny UNet drives the
latents up to |x| ≈ 12): "precise" (N = 8192, [60, 40, 60], Δ = 2^40) 1e-4 after 3 updates (measured 7e-6 on the
latents, 5e-7 on the image); "reference" (HE-Diffusion's N = 8192, [31, 26×6, 31], Δ = 2^26) 5e-2 after 2
updates (measured 1.3e-2; ≈ 5e-3 per update on N(0, 1) values in the reference note, §7)."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("tenseal")
pytest.importorskip("aiohttp")

from privdiff.he.ckks import PRESETS, TenSEALContext  # noqa: E402
from privdiff.he.compat import PLMSSchedule, plms_update  # noqa: E402

from .conftest import BackgroundServer  # noqa: E402

PROMPT = "a red circle"
PRECISE_TOL, REFERENCE_TOL = 1e-4, 5e-2


@pytest.mark.parametrize(
    "prediction_type,spacing", [("epsilon", "leading"), ("v_prediction", "leading"), ("epsilon", "trailing")]
)
def test_plms_update_equals_diffusers_pndm(prediction_type, spacing):
    """(f, a) of every update, applied to x_t, is diffusers' PNDMScheduler (skip_prk_steps) step on the same outputs."""
    from privdiff.diffusion.schedulers import make_scheduler

    config = {
        "_class_name": "DDIMScheduler",
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "prediction_type": prediction_type,
        "timestep_spacing": spacing,
        "steps_offset": 1,
    }
    net = lambda x, t: torch.tanh(x) * (1 + t / 1000) - 0.1 * x  # noqa: E731  any deterministic output
    steps = 6
    ref = make_scheduler("pndm", config)
    ref.set_timesteps(steps)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected, y = [], x.clone()
    for i, t in enumerate(ref.timesteps):
        y = ref.step(net(y, int(t)), t, y).prev_sample
        if i:  # call 0 is PNDM's intermediate step
            expected.append(y)
    schedule, history, got, z = PLMSSchedule.from_config(config, steps=steps), [], [], x.clone()
    for i in range(steps):
        f, a = plms_update(schedule, i, z, predict=net, history=history)
        z = f * z + a
        got.append(z)
    assert len(history) == steps
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e.to(g.dtype), atol=1e-6, rtol=1e-6)  # diffusers: float32 coefficients


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from tests.helpers import tiny_sd_pipeline

    path = tmp_path_factory.mktemp("sd") / "pipe"
    tiny_sd_pipeline(path, layout="sd1")
    return path


@pytest.fixture(scope="module")
def pipeline_server(pipeline_dir):
    from privdiff.he.server import ServiceConfig, load_pipeline_service

    srv = BackgroundServer(load_pipeline_service(pipeline_dir, config=ServiceConfig(timeout_s=60), device="cpu"))
    yield srv
    srv.close()


def plaintext_plms(pipeline_dir, *, seed: int, steps: int, guidance: float):
    """Plaintext PLMS on the pipeline (privdiff's scheduler loop): the latent after each update and the decoded image."""
    from privdiff.diffusion import guided_denoiser
    from privdiff.diffusion.discrete import VPDenoiser
    from privdiff.diffusion.schedulers import make_scheduler, sample_scheduler
    from privdiff.models.pretrained import load_pipeline_vae, load_text_pipeline

    net = load_text_pipeline(pipeline_dir).eval()
    den = VPDenoiser(net, schedule=net.schedule)
    fn = guided_denoiser(den, net.conditions(prompts=[PROMPT], n=1), guidance=guidance, null_label=net.null_condition())
    seen = []
    x = sample_scheduler(
        fn,
        scheduler=make_scheduler("pndm", net.scheduler_config),
        schedule=net.schedule,
        shape=(1, *net.sample_shape),
        steps=steps,
        generator=torch.Generator().manual_seed(seed),
        callback=lambda state: seen.append(state["x"].double().numpy()),
    )
    vae = load_pipeline_vae(pipeline_dir)
    with torch.no_grad():
        image = ((vae.decode(x / vae.config.scaling_factor).sample.clamp(-1, 1) + 1) / 2).numpy()
    return seen[1:], image  # callback 0 is PNDM's intermediate step


def test_compat_generation_over_http_equals_plaintext_plms(pipeline_dir, pipeline_server):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from privdiff.he.client import generate

    steps, w, seed = 3, 2.0, 7
    result = generate(pipeline_server.url, PROMPT, mode="compat", seed=seed, steps=steps, guidance=w, progress=False)
    trajectory, image = plaintext_plms(pipeline_dir, seed=seed, steps=steps, guidance=w)
    assert result.evaluations == result.rounds == steps and len(result.latents) == steps
    for he, plain in zip(result.latents, trajectory):
        assert np.abs(he - plain).max() < PRECISE_TOL
    assert result.image.shape == image.shape == (1, 3, 16, 16)
    assert np.abs(result.image - image).max() < PRECISE_TOL
    # and diffusers' own StableDiffusionPipeline with PNDM (guidance scale 1 + w), its x_T drawn from the same seed
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True, safety_checker=None)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=1 + w,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        return_dict=False,
    )[0]
    assert np.abs(result.image[0].transpose(1, 2, 0) - out[0]).max() < PRECISE_TOL


def test_an_sd2_style_v_prediction_pipeline(tmp_path):
    """SD 2.x's layout (linear projections, GELU text encoder, an Euler scheduler config) with v-prediction: PLMS
    built from its config, the same equality."""
    from privdiff.he.client import generate
    from privdiff.he.server import load_pipeline_service
    from tests.helpers import tiny_sd_pipeline

    tiny_sd_pipeline(tmp_path / "sd2", layout="sd2", prediction_type="v_prediction")
    srv = BackgroundServer(load_pipeline_service(tmp_path / "sd2", device="cpu"))
    try:
        result = generate(srv.url, PROMPT, mode="compat", seed=3, steps=2, guidance=1.5, progress=False)
    finally:
        srv.close()
    trajectory, image = plaintext_plms(tmp_path / "sd2", seed=3, steps=2, guidance=1.5)
    assert max(np.abs(he - plain).max() for he, plain in zip(result.latents, trajectory)) < PRECISE_TOL
    assert np.abs(result.image - image).max() < PRECISE_TOL


def test_reference_parameters_stay_within_their_tolerance(pipeline_dir, pipeline_server):
    from privdiff.he.client import generate

    ctx = TenSEALContext.generate(PRESETS["reference"])
    result = generate(
        pipeline_server.url, PROMPT, mode="compat", seed=1, steps=2, guidance=0.0, progress=False, context=ctx
    )
    trajectory, image = plaintext_plms(pipeline_dir, seed=1, steps=2, guidance=0.0)
    err = max(np.abs(he - plain).max() for he, plain in zip(result.latents, trajectory))
    assert 1e-7 < err < REFERENCE_TOL  # visibly coarser than "precise", within the stated bound
    assert np.abs(result.image - image).max() < REFERENCE_TOL


def _post(url: str, body: bytes) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=30) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def test_the_pipeline_server_refuses_what_it_does_not_serve(pipeline_server):
    from privdiff.he.client import generate
    from privdiff.he.server import encode_frames

    url = pipeline_server.url
    ctx = TenSEALContext.generate(PRESETS["small"])
    with pytest.raises(ValueError, match="compat mode only"):
        generate(url, PROMPT, mode="private", steps=2, progress=False, context=ctx)
    precise = TenSEALContext.generate(PRESETS["precise"]).public_bytes()
    for query, reason in (
        ({"mode": "private"}, "mode must be one of"),
        ({"mode": "compat", "steps": "1"}, "steps must be an integer in [2, 500]"),
        ({"mode": "compat", "steps": "x"}, "steps must be"),
    ):
        code, text = _post(f"{url}/v1/sessions?{urllib.parse.urlencode(query)}", precise)
        assert code == 400 and reason in text, (query, code, text)
    code, text = _post(f"{url}/v1/sessions?mode=compat&steps=3", precise)
    sid = __import__("json").loads(text)["session"]
    frames = encode_frames([b"\0" * 4 * 256, b"", b"\0" * 8 * 256])  # nothing encrypted: x_t = r = 0
    for step, reason in (("1", "step 1 before step 0"), ("3", "step must be in [0, 3)"), ("a", "step must be")):
        code, text = _post(f"{url}/v1/sessions/{sid}/compat-step?step={step}", frames)
        assert code == 400 and reason in text, (step, code, text)
    for step in ("0", "0", "1"):  # in order, and a repeated update is recomputed
        assert _post(f"{url}/v1/sessions/{sid}/compat-step?step={step}", frames)[0] == 200
    code, text = _post(f"{url}/v1/sessions/{sid}/compat-step?sigma=1&sigma_next=0", frames)
    assert code == 400 and "allowed: step" in text


def test_cli_generate_writes_the_pipelines_own_image(pipeline_dir, pipeline_server, tmp_path, capsys):
    """`privdiff he generate --mode compat` writes the PNG StableDiffusionPipeline (PNDM) writes for the same seed,
    prompt, steps and guidance scale 1 + w: the same size, pixels equal up to the 8-bit rounding of CKKS noise."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from PIL import Image

    from privdiff.cli import main

    out, threads = tmp_path / "he.png", torch.get_num_threads()
    argv = [
        "he",
        "generate",
        "--server",
        pipeline_server.url,
        "--mode",
        "compat",
        "--prompt",
        PROMPT,
        "--out",
        str(out),
    ]
    try:
        assert main(argv + ["--steps", "2", "--guidance", "3", "--seed", "4", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)  # the command sets one thread for the rest of the process
    assert "compat mode, 2 denoiser evaluations" in capsys.readouterr().out
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True, safety_checker=None)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPT, num_inference_steps=2, guidance_scale=4.0, generator=torch.Generator().manual_seed(4)).images[0]
    got = Image.open(out)
    assert got.size == ref.size == (16, 16) and got.mode == ref.mode == "RGB"
    assert np.abs(np.asarray(got, np.int16) - np.asarray(ref, np.int16)).max() <= 1


def test_cli_serve_refuses_a_directory_that_is_not_a_pipeline(tmp_path, capsys):
    from privdiff.cli import main

    (tmp_path / "unet").mkdir()
    for argv in (
        ["--pipeline", str(tmp_path)],
        ["--pipeline", str(tmp_path / "missing")],
        [],
        [str(tmp_path), "--pipeline", str(tmp_path)],
    ):
        capsys.readouterr()
        assert main(["he", "serve", *argv, "--port", "0"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("privdiff: error:") and "\n" not in err, (argv, err)
