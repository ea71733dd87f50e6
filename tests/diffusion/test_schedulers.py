"""A pretrained net sampled with the pipeline's own diffusers schedulers (DDIM, PNDM/PLMS, Euler, DPM-Solver):
privdiff's loop on D(x; σ) equals diffusers' own loop on the net's raw output, and a text pipeline's samples
equal ``StableDiffusionPipeline``'s for the same prompt, guidance and initial latents."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import diffusers
import pytest
import torch

from privdiff.config import RecipeError, resolve_recipe
from privdiff.core.generation import generate
from privdiff.diffusion import Denoiser
from privdiff.diffusion.discrete import DiscreteSchedule, VPDenoiser
from privdiff.diffusion.schedulers import SCHEDULERS, make_scheduler, sample_scheduler
from privdiff.models.pretrained import DiffusersUNetNet, load_text_pipeline
from tests.helpers import tiny_pixel_unet, tiny_sd_pipeline

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
CONFIG = {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


def _random_unet(seed: int):
    unet = tiny_pixel_unet(seed, classes=None).eval()
    with torch.no_grad():  # off the init's near-zero output, so every step moves the sample
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


def _reference(unet, scheduler, *, shape, steps, seed):
    """diffusers' own sampling loop: the raw net output (ε̂ or v̂) straight into the scheduler's step."""
    g = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn(shape, generator=g) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, t), t).sample
        kwargs = {"generator": g} if "generator" in scheduler.step.__code__.co_varnames else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x, len(scheduler.timesteps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["ddim", "pndm", "euler", "euler-ancestral", "dpm-solver", "ddpm"])
@torch.no_grad()
def test_privdiff_loop_equals_diffusers_loop_on_the_raw_net(name, prediction_type):
    seed = int(torch.randint(0, 2**31, ()).item())
    config = CONFIG | {"prediction_type": prediction_type}
    unet = _random_unet(seed)
    schedule = DiscreteSchedule.from_config(config)
    steps = 1000 if name == "ddpm" else 5  # DDPM steps through every trained timestep
    if name == "ddpm":
        config = config | {"num_train_timesteps": 20}  # ... so a short table for it
        schedule = DiscreteSchedule.from_config(config)
        steps = 20
    ref_cls = getattr(diffusers, SCHEDULERS[name])
    ref_config = config | ({"skip_prk_steps": True} if name == "pndm" else {})
    expected, n_steps = _reference(unet, ref_cls.from_config(ref_config), shape=(3, 1, 8, 8), steps=steps, seed=seed)
    denoiser = VPDenoiser(DiffusersUNetNet(unet, schedule), schedule=schedule)
    calls = []
    got = sample_scheduler(
        lambda x, s: denoiser(x, s),
        scheduler=make_scheduler(name, config),
        schedule=schedule,
        shape=(3, 1, 8, 8),
        steps=steps,
        generator=torch.Generator().manual_seed(seed),
        callback=calls.append,
    )
    # Euler's "linspace" spacing puts t between the table's integers; there privdiff's σ(t) interpolates log σ
    # (k-diffusion's t(σ)) and diffusers' Euler σ itself: a v̂ → ε̂ conversion differs in the 4th digit at most
    tol = 1e-3 if name.startswith("euler") and prediction_type == "v_prediction" else 1e-4
    assert got.abs().max() > 0.1 and not torch.equal(got, torch.randn_like(got))
    assert torch.allclose(got, expected, rtol=tol, atol=tol * expected.abs().max().item()), (got - expected).abs().max()
    assert [c["i"] for c in calls] == list(range(n_steps))  # one callback per step of the scheduler


def test_t_to_sigma_inverts_sigma_to_t():
    schedule = DiscreteSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.rand(50, dtype=torch.float64) * (schedule.num_train_timesteps - 1)
    assert torch.allclose(schedule.sigma_to_t(schedule.t_to_sigma(t)), t, atol=1e-9)
    integers = torch.randint(0, schedule.num_train_timesteps, (20,))
    assert torch.allclose(schedule.t_to_sigma(integers), schedule.sigmas()[integers], rtol=1e-12)


def test_unknown_scheduler_and_privdiff_nets_are_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="unknown scheduler 'plms2'"):
        make_scheduler("plms2", CONFIG)
    with pytest.raises(ValueError, match="not a diffusers scheduler class"):
        make_scheduler("pipeline", CONFIG | {"_class_name": "NoSuchScheduler"})
    with pytest.raises(RecipeError, match="sampler.scheduler must be null or one of"):
        resolve_recipe(RECIPES / "dpdm-mnist5k.yaml", ["sampler.scheduler=plms2"])
    recipe = resolve_recipe(RECIPES / "dpdm-mnist5k.yaml", ["sampler.scheduler=ddim"])

    class Net(torch.nn.Module):
        sample_shape = (1, 4, 4)

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, c_noise, cond=None):
            return self.w * x

        def conditions(self, *, labels=None, prompts=None, n):
            return None

        def null_condition(self):
            return None

    with pytest.raises(ValueError, match="the pipeline schedulers sample a pretrained discrete-time net"):
        generate(Denoiser(Net()), labels=None, n=2, recipe=recipe, progress=False)


@pytest.mark.parametrize(
    "layout,prediction_type", [("sd1", "epsilon"), ("sd1", "v_prediction"), ("sd2", "v_prediction")]
)
def test_text_pipeline_samples_equal_stable_diffusion_pipeline(tmp_path, layout, prediction_type):
    """The same prompt, classifier-free guidance and initial latents through ``generate`` with the pipeline's own
    scheduler and through diffusers' ``StableDiffusionPipeline``: the same latents (guidance w in privdiff's
    (1 + w)·D(c) − w·D(∅) is the pipeline's guidance_scale 1 + w). SD 1.x's layout with DDIM, SD 2.x's with Euler."""
    pipe = tiny_sd_pipeline(tmp_path / "pipe", prediction_type=prediction_type, seed=3, layout=layout)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe.save_pretrained(tmp_path / "pipe")
    net = load_text_pipeline(tmp_path / "pipe")
    recipe = resolve_recipe(
        RECIPES / "sd-dp-ldm.yaml", ["model.pretrained=" + str(tmp_path / "pipe"), "sampler.scheduler=pipeline"]
    )
    recipe = dataclasses.replace(recipe, sampler=dataclasses.replace(recipe.sampler, guidance=2.0, steps=4))
    seed = 11
    got = generate(
        VPDenoiser(net, schedule=net.schedule),
        labels=None,
        prompts=["a cat"],
        n=2,
        recipe=recipe,
        seed=seed,
        progress=False,
    )
    latents = torch.randn((2, *net.sample_shape), generator=torch.Generator().manual_seed(seed))
    expected = pipe(
        "a cat",
        num_images_per_prompt=2,
        guidance_scale=3.0,
        num_inference_steps=4,
        latents=latents,
        output_type="latent",
        height=16,
        width=16,
    ).images
    expected = ((expected.clamp(-1, 1) + 1) / 2).numpy()
    assert abs(got - expected).max() < 1e-4, abs(got - expected).max()
