"""Discrete-time DDPM objectives as EDM denoisers, against diffusers' own schedulers on random inputs."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from privdiff.diffusion import denoising_loss, sample_euler
from privdiff.diffusion.discrete import DiscreteSchedule, DiscreteSigma, VPDenoiser

CONFIGS = [
    dict(beta_schedule="linear", prediction_type="epsilon"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon"),  # SD 1.x
    dict(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"
    ),  # SD 2.x 768
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
]


class TimeNet(nn.Module):
    """A small random net whose output depends on x_t, on t and on a condition vector."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.time = nn.Linear(1, 2)

    def forward(self, x, t, cond):
        h = self.conv(x) + self.time((t / 1000.0)[:, None])[:, :, None, None]
        return torch.tanh(h) * (1 + cond[:, :, None, None]) if cond is not None else torch.tanh(h)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c['beta_schedule']}-{c['prediction_type']}")
def test_schedule_is_the_schedulers(config):
    sched = DDPMScheduler(**config)
    ours = DiscreteSchedule.from_config(sched.config)
    torch.testing.assert_close(ours.alphas_cumprod(), sched.alphas_cumprod.double(), rtol=1e-5, atol=1e-7)
    t = torch.arange(0, 1000, 37)
    assert torch.equal(ours.sigma_to_t(ours.sigmas()[t]), t.double())  # exact integers at the table's σ_t


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c['beta_schedule']}-{c['prediction_type']}")
@pytest.mark.parametrize("K", [1, 3])
def test_per_example_loss_is_the_nets_own_objective(config, K):
    """denoising_loss(VPDenoiser) = mean_k mean‖ε̂ − ε‖² (or ‖v̂ − v‖²) with x_t from the scheduler's add_noise."""
    sched = DDPMScheduler(**config)
    schedule = DiscreteSchedule.from_config(sched.config)
    net = TimeNet(seed=K)
    den = VPDenoiser(net, schedule=schedule)
    g = torch.Generator().manual_seed(7 + K)
    B = 5
    x0 = torch.rand(B, 2, 6, 6, generator=g) * 2 - 1
    cond = torch.randn(B, K, 2, generator=g)
    t = torch.randint(0, 1000, (B, K), generator=g)
    sigma = schedule.sigmas()[t]
    eps = torch.randn(B, K, 2, 6, 6, generator=g)
    ours = denoising_loss(den, x0, cond, sigma=sigma, noise=eps)

    rows_x0, rows_eps, rows_t = x0.repeat_interleave(K, 0), eps.flatten(0, 1), t.flatten()
    x_t = sched.add_noise(rows_x0, rows_eps, rows_t)
    target = rows_eps if config["prediction_type"] == "epsilon" else sched.get_velocity(rows_x0, rows_eps, rows_t)
    pred = net(x_t, rows_t.float(), cond.flatten(0, 1))
    direct = (pred - target).square().flatten(1).mean(1).view(B, K).mean(1)
    torch.testing.assert_close(ours, direct, rtol=2e-4, atol=1e-6)


def test_discrete_sigma_draws_the_tables_levels_uniformly():
    schedule = DiscreteSchedule(num_train_timesteps=10)
    s = DiscreteSigma(schedule)((20000,), generator=torch.Generator().manual_seed(0))
    t = schedule.sigma_to_t(s)
    assert torch.equal(t, t.round()) and set(t.long().tolist()) == set(range(10))
    assert torch.bincount(t.long()).min() > 1800  # ≈ 2000 each


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_privdiff_euler_is_ddim_on_the_pretrained_net(prediction_type):
    """Euler on dx/dσ = (x − D)/σ over the net's own σ_t equals diffusers' DDIM (η = 0) on the same timesteps."""
    config = dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
    )
    ddim = DDIMScheduler(**config, set_alpha_to_one=True)
    ddim.set_timesteps(8)
    schedule = DiscreteSchedule.from_config(ddim.config)
    net = TimeNet(seed=3)
    den = VPDenoiser(net, schedule=schedule)
    z = torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(4))

    x_t = z.clone()
    with torch.no_grad():
        for t in ddim.timesteps:
            x_t = ddim.step(net(x_t, t.float().expand(2), None), t, x_t).prev_sample
    sigmas = torch.cat([schedule.sigmas()[ddim.timesteps], torch.zeros(1, dtype=torch.float64)])
    # the VP state x_t is α·x in σ-space: start from x = x_t/α at the first σ
    x = z * (1 + sigmas[0] ** 2).sqrt().float()
    ours = sample_euler(lambda x, s: den(x, s.double()), x, sigmas)
    torch.testing.assert_close(ours, x_t, rtol=1e-4, atol=1e-4)


def test_unsupported_scheduler_configs_are_refused():
    with pytest.raises(ValueError, match="trained_betas"):
        DiscreteSchedule.from_config({"trained_betas": [0.1, 0.2]})
    with pytest.raises(ValueError, match="beta_schedule"):
        DiscreteSchedule.from_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="prediction_type"):
        DiscreteSchedule.from_config({"prediction_type": "sample"})
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        DiscreteSchedule.from_config({"rescale_betas_zero_snr": True})
