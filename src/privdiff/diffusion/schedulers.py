"""Sampling a discrete-time net with a diffusers scheduler: the pipeline's own DDIM, PNDM/PLMS, Euler, DPM-Solver.

A pretrained pipeline is sampled, in its own ecosystem, by a scheduler that walks the net's discrete
timesteps t_N > … > t_1 on the VP process x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε (Ho et al. 2020). privdiff
holds every model as a denoiser D(x; σ) on x = x_0 + σ·ε (Karras et al. 2022), so one loop drives any
scheduler on any such D (guided or not), with the scheduler's own update, timesteps and spacing:

    x_in  = scale_model_input(x, t)        the net's input x_t (VP scale) at timestep t
    σ     = σ(t),  x̃ = √(1 + σ²)·x_in      the same point in D's scale (x̃ = x_t/√ᾱ_t)
    ε̂     = (x̃ − D(x̃; σ))/σ                 the noise D implies
    v̂     = α·ε̂ − ασ·D,  α = 1/√(1 + σ²)     (v-prediction nets: v = √ᾱ_t·ε − √(1 − ᾱ_t)·x_0)
    x     = step(ε̂ or v̂, t, x)               the scheduler's update (DDIM, PLMS, DPM-Solver, …)

The scheduler receives what the net predicts (its ``prediction_type``), recovered exactly from D, so it
runs as it does in the user's diffusers pipeline (PLMS, for one, combines past v̂ before converting them).
With guidance, D is the guided (1 + w)·D(c) − w·D(∅), which is the pipeline's guided output at scale 1 + w.
σ(t) interpolates log σ between the table's integer timesteps, as
:meth:`~.discrete.DiscreteSchedule.sigma_to_t` does, so the net is called at exactly the scheduler's t.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .discrete import DiscreteSchedule

__all__ = ["SCHEDULERS", "make_scheduler", "model_output", "sample_scheduler"]

SCHEDULERS: dict[str, str] = {
    "pipeline": "",  # the class the pipeline was saved with (Stable Diffusion 1.x: PNDM)
    "ddim": "DDIMScheduler",  # Song et al. 2021, η = 0
    "pndm": "PNDMScheduler",  # Liu et al. 2022 (PLMS with skip_prk_steps, as SD's pipeline and the seeds use)
    "plms": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",  # Karras et al. 2022, Algorithm 1 on the net's timesteps
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "dpm-solver": "DPMSolverMultistepScheduler",  # Lu et al. 2022, DPM-Solver++(2M)
    "ddpm": "DDPMScheduler",  # Ho et al. 2020, ancestral, one step per trained timestep
}
"""``sampler.scheduler`` names → diffusers scheduler classes, built from the pipeline's own scheduler config."""


def make_scheduler(name: str, config: Mapping[str, Any]):
    """The diffusers scheduler ``name`` (a key of :data:`SCHEDULERS`) on the net's scheduler ``config`` (β schedule,
    timestep spacing, offsets, prediction type: :func:`sample_scheduler` hands it what the net predicts).

    Raises:
        ValueError: One line for an unknown name, or a config naming a class diffusers does not have.
    """
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    class_name = SCHEDULERS[name] or str(config.get("_class_name") or "DDPMScheduler")
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "step"):
        raise ValueError(f"the pipeline's scheduler {class_name!r} is not a diffusers scheduler class")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if "skip_prk_steps" in inspect.signature(cls.__init__).parameters:
        config["skip_prk_steps"] = True  # PLMS alone, as Stable Diffusion's pipeline runs it
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # another class's config keys (e.g. PNDM's for DDIM) are ignored quietly
    try:
        return cls.from_config(config)
    finally:
        diffusers_logging.set_verbosity(level)


def model_output(denoise: Callable[[Tensor, Tensor], Tensor], *, schedule: DiscreteSchedule, x_in: Tensor, t) -> Tensor:
    """What the net trained on ``schedule`` predicts (ε̂, or v̂ for a v-prediction net) at its input x_t = ``x_in``
    and timestep ``t``, recovered exactly from the denoiser ``denoise(x, sigma)`` (see the module docstring)."""
    # σ(t), and the same point in D's scale: x̃ = √(1 + σ²)·x_t
    sigma = schedule.t_to_sigma(torch.as_tensor(t, dtype=torch.float64, device=x_in.device).reshape(1))
    x_tilde = x_in * (1 + sigma.square()).sqrt().to(x_in.dtype)
    s = sigma.to(x_in.dtype).expand(x_in.shape[0])
    D = denoise(x_tilde, s)
    view = s.view(-1, *([1] * (x_in.ndim - 1)))
    # ε̂ = (x̃ − D)/σ
    out = (x_tilde - D) / view
    if schedule.prediction_type == "v_prediction":
        # v̂ = α·(ε̂ − σ·D), α = 1/√(1 + σ²)
        out = (out - view * D) / (1 + view.square()).sqrt()
    return out


@torch.no_grad()
def sample_scheduler(
    denoise: Callable[[Tensor, Tensor], Tensor],
    *,
    scheduler,
    schedule: DiscreteSchedule,
    shape: tuple[int, ...],
    steps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> Tensor:
    """Draw samples [B, C, H, W] by running ``scheduler`` (:func:`make_scheduler`) for ``steps`` steps on the denoiser
    ``denoise(x, sigma)`` of a net trained on ``schedule`` (see the module docstring).

    ``generator`` draws x_T ~ N(0, init_noise_sigma²·I) and any noise the scheduler adds (DDPM, ancestral);
    ``callback`` gets ``{"i", "t", "x"}`` after every step. Returns float32 samples, unclamped."""
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    predicts = scheduler.config.get("prediction_type", "epsilon")
    if predicts != schedule.prediction_type:
        raise ValueError(f"the scheduler expects {predicts}, the net predicts {schedule.prediction_type}")
    scheduler.set_timesteps(steps, device=device)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    # x_T ~ N(0, σ_T²·I) in the scheduler's own scale (1 for DDIM/PLMS/DPM-Solver, √(σ_max² + 1) for Euler)
    x = torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    x = x * float(scheduler.init_noise_sigma)
    for i, t in enumerate(scheduler.timesteps):
        # the net's input x_t at timestep t, and what the net predicts there
        out = model_output(denoise, schedule=schedule, x_in=scheduler.scale_model_input(x, t), t=t)
        # the scheduler's update on what the net predicts
        x = scheduler.step(out, t, x, **({"generator": generator} if takes_generator else {})).prev_sample
        if callback is not None:
            callback({"i": i, "t": t, "x": x})
    return x.float()
