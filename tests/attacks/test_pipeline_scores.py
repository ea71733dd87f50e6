"""The attacks' score functions on a text-to-image pipeline's net, each checked against a direct computation in
DDPM's own terms, one example at a time: the raw UNet ε_θ(x_t, t, text(caption)) on x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε,
with the pipeline's scaled-linear ᾱ_t and each example's own caption."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privdiff.attacks.scores import loss_scores, pia_scores, secmi_scores
from privdiff.attacks.target import Target
from privdiff.config import resolve_recipe
from privdiff.diffusion.discrete import VPDenoiser
from privdiff.models.pretrained import load_text_pipeline
from tests.helpers import tiny_sd_pipeline

CAPTIONS = ["red cat", "blue dog", "tree"]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "pipe"
    pipe = tiny_sd_pipeline(path, seed=int(np.random.default_rng().integers(0, 10_000)))
    with torch.no_grad():  # off the init, so that every timestep and caption matters
        for p in pipe.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe.save_pretrained(path)
    net = load_text_pipeline(path).eval()
    recipe = resolve_recipe({"method": "dp-finetune", "model": {"pretrained": str(path)}})
    return Target(denoiser=VPDenoiser(net, schedule=net.schedule), recipe=recipe, batch_size=2)


def _direct(target: Target):
    """ε_θ(x_t, t; caption) of the raw UNet and ᾱ_t, as a DDPM paper writes them."""
    net = target.denoiser.net
    abar = net.schedule.alphas_cumprod()

    def eps(x_t: torch.Tensor, t: int, caption: str) -> torch.Tensor:
        hidden = net.text_encoder(net.tokenize([caption]))[0]
        return net.unet(x_t, torch.tensor([t]), encoder_hidden_states=hidden).sample

    return eps, abar


@torch.no_grad()
def test_pia_equals_its_ddpm_definition_one_example_at_a_time(target):
    x0 = torch.randn(3, 4, 8, 8)
    cond = target.denoiser.net.conditions(prompts=CAPTIONS, n=3)
    got = pia_scores(target, x0, cond, t=200)
    eps, abar = _direct(target)
    for b in range(3):
        a0, at = abar[0].float(), abar[200].float()
        # ε̂₀ = ε_θ(√ᾱ_0·x₀, 0);  x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε̂₀;  s = −Σ|ε̂₀ − ε_θ(x_t, t)|⁴
        e0 = eps(a0.sqrt() * x0[b : b + 1], 0, CAPTIONS[b])
        et = eps(at.sqrt() * x0[b : b + 1] + (1 - at).sqrt() * e0, 200, CAPTIONS[b])
        assert got[b] == pytest.approx(-(e0 - et).abs().pow(4).sum().item(), rel=1e-4)


@torch.no_grad()
def test_secmi_equals_its_ddim_definition_one_example_at_a_time(target):
    x0 = torch.randn(3, 4, 8, 8)
    cond = target.denoiser.net.conditions(prompts=CAPTIONS, n=3)
    t_sec, k = 30, 10
    got = secmi_scores(target, x0, cond, t_sec=t_sec, k=k)
    eps, abar = _direct(target)
    abar = abar.float()

    def ddim(x, t, s, caption):  # x_s = √ᾱ_s·(x_t − √(1 − ᾱ_t)·ε̂)/√ᾱ_t + √(1 − ᾱ_s)·ε̂
        e = eps(x, t, caption)
        return abar[s].sqrt() * (x - (1 - abar[t]).sqrt() * e) / abar[t].sqrt() + (1 - abar[s]).sqrt() * e

    for b in range(3):
        x = abar[0].sqrt() * x0[b : b + 1]  # x₀ at t = 0
        for t in range(0, t_sec - k, k):  # deterministic inversion to t_sec − k
            x = ddim(x, t, t + k, CAPTIONS[b])
        back = ddim(ddim(x, t_sec - k, t_sec, CAPTIONS[b]), t_sec, t_sec - k, CAPTIONS[b])
        # privdiff measures the t-error in x = x_t/√ᾱ_t: the same ranking, scaled by 1/ᾱ_{t_sec−k} for every example
        assert got[b] == pytest.approx(-(back - x).square().sum().item() / abar[t_sec - k].item(), rel=1e-3)


@torch.no_grad()
def test_loss_attack_equals_its_ddpm_definition_with_the_same_noise(target):
    x0 = torch.randn(3, 4, 8, 8)
    cond = target.denoiser.net.conditions(prompts=CAPTIONS, n=3)
    timesteps, draws, seed = (50, 300), 2, 7
    got = loss_scores(target, x0, cond, timesteps=timesteps, draws=draws, seed=seed)
    eps, abar = _direct(target)
    g = torch.Generator().manual_seed(seed)
    errors = torch.zeros(3)
    for batch in (range(0, 2), range(2, 3)):  # the attack's batches of 2, drawing ε batch by batch
        for t in timesteps:
            for _ in range(draws):
                noise = torch.randn((len(batch), 4, 8, 8), generator=g)
                for j, b in enumerate(batch):
                    a = abar[t].float()
                    # ‖ε − ε_θ(√ᾱ_t·x₀ + √(1 − ᾱ_t)·ε, t)‖² / dim
                    x_t = a.sqrt() * x0[b : b + 1] + (1 - a).sqrt() * noise[j : j + 1]
                    errors[b] += (noise[j : j + 1] - eps(x_t, t, CAPTIONS[b])).square().mean()
    np.testing.assert_allclose(got, -(errors / (len(timesteps) * draws)).double().numpy(), rtol=1e-4)
    assert len(set(np.round(got, 6))) == 3
