"""Attack scores on a tiny denoiser: a reference check of the σ-space DDIM, and an overfit model caught."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from privdiff.attacks.metrics import attack_metrics
from privdiff.attacks.proxy import proxy_scores
from privdiff.attacks.scores import loss_scores, pia_scores, secmi_scores
from privdiff.core.proxy import LOSS_TIMESTEPS, feature_dim, proxy_features
from privdiff.diffusion.discrete import ddpm_sigma
from privdiff.attacks.target import Target
from privdiff.config import resolve_recipe
from privdiff.diffusion import Denoiser, denoising_loss, draw_training_noise, make_sigma_distribution


class MLPNet(nn.Module):
    """F(x_in, c_noise, labels): a small MLP, enough to memorise a handful of 1×4×4 images."""

    def __init__(self, dim=16, width=128):
        super().__init__()
        self.f = nn.Sequential(
            nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim)
        )

    def forward(self, x, c_noise, labels=None):
        return self.f(torch.cat([x.flatten(1), c_noise.view(-1, 1)], 1)).view_as(x)

    def conditions(self, *, labels=None, prompts=None, n):
        return None


def _target(net):
    return Target(denoiser=Denoiser(net).eval().requires_grad_(False), recipe=resolve_recipe(None), batch_size=64)


def test_ddpm_sigma_matches_diffusers_linear_schedule():
    from diffusers import DDPMScheduler

    abar = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod.double()
    for t in (0, 10, 100, 200, 999):
        assert ddpm_sigma(t) == pytest.approx(
            math.sqrt(1 / abar[t].item() - 1), rel=1e-4
        )  # diffusers keeps ᾱ in float32


def test_secmi_and_pia_equal_a_slow_reference_in_ddpm_variables():
    """SecMI written as the paper (VP x_t, ε_θ(x_t, t), ᾱ from diffusers), one example at a time."""
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    target = _target(MLPNet())
    x0 = torch.rand(5, 1, 4, 4) * 2 - 1
    abar = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod.double()

    def eps_vp(x_t, t):  # ε_θ(x_t, t) of the VP chain = ε̂(x_t/√ᾱ_t, σ_t)
        return target.eps(x_t / abar[t].sqrt().float(), ddpm_sigma(t), None)

    def ddim(x_t, t, s):  # φ / ψ: x_s = √ᾱ_s·f_θ(x_t, t) + √(1−ᾱ_s)·ε_θ(x_t, t)
        e = eps_vp(x_t, t)
        f = (x_t - (1 - abar[t]).sqrt().float() * e) / abar[t].sqrt().float()
        return abar[s].sqrt().float() * f + (1 - abar[s]).sqrt().float() * e

    ref = []
    for i in range(len(x0)):
        x = x0[i : i + 1]
        for t in range(0, 90, 10):
            x = ddim(x, t, t + 10)
        back = ddim(ddim(x, 90, 100), 100, 90)
        ref.append(-(back - x).square().sum().item())
    ours = secmi_scores(target, x0, None, t_sec=100, k=10)
    np.testing.assert_allclose(ours * abar[90].item(), ref, rtol=1e-3)  # σ-space = VP space / √ᾱ_{t_sec−k}

    # PIA: x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε_θ(x₀, 0), score −Σ|ε_θ(x₀, 0) − ε_θ(x_t, t)|⁴
    e0 = eps_vp(x0 * abar[0].sqrt().float(), 0)
    xt = abar[200].sqrt().float() * x0 + (1 - abar[200]).sqrt().float() * e0
    ref_pia = -(e0 - eps_vp(xt, 200)).abs().pow(4).flatten(1).sum(1)
    np.testing.assert_allclose(pia_scores(target, x0, None, t=200), ref_pia.double().numpy(), rtol=1e-3)


@pytest.fixture(scope="module")
def overfit():
    """A denoiser trained 250 steps on 16 members only: it memorises them."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    members, nonmembers = torch.rand(16, 1, 4, 4, generator=g) * 2 - 1, torch.rand(16, 1, 4, 4, generator=g) * 2 - 1
    den = Denoiser(MLPNet())
    opt = torch.optim.Adam(den.parameters(), lr=3e-3)
    dist = make_sigma_distribution("lognormal", P_mean=-1.2, P_std=1.2)
    for _ in range(250):
        sigma, noise = draw_training_noise(members, K=2, sigma_dist=dist, generator=g)
        loss = denoising_loss(den, members, None, sigma=sigma, noise=noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (
        Target(denoiser=den.eval().requires_grad_(False), recipe=resolve_recipe(None), batch_size=64),
        members,
        nonmembers,
    )


def test_overfit_model_is_caught_by_the_loss_attack(overfit):
    target, m, n = overfit
    auc = attack_metrics(loss_scores(target, m, None), loss_scores(target, n, None))["auc"]
    assert auc > 0.85
    for fn in (secmi_scores, pia_scores):
        s = fn(target, m, None)
        assert s.shape == (16,) and np.isfinite(s).all()


def test_proxy_attacker_learns_the_overfit_model(overfit):
    target, m, n = overfit
    # aux and test halves of the members and non-members
    sm, sn = proxy_scores(target, (m[:8], None, n[:8], None), (m[8:], None, n[8:], None), epochs=40, draws=4, lr=1e-3)
    assert sm.shape == (8,) and np.isfinite(sn).all()
    assert attack_metrics(sm, sn)["auc"] > 0.6  # 8 aux examples a side: a weak but real signal (loss AUC is 1.0)


def test_proxy_loss_feature_is_the_log_loss_at_the_drawn_goldilocks_t(overfit):
    target, m, _ = overfit
    dist = target.sigma_distribution()
    f = proxy_features(target.eps, m, None, kind="loss", sigma_dist=dist, generator=torch.Generator().manual_seed(3))
    assert f.shape == (16, feature_dim("loss", tuple(m.shape[1:]))) == (16, 1 + len(LOSS_TIMESTEPS))
    # the slow reference: the same draws (t index, then ε), one example at a time
    g = torch.Generator().manual_seed(3)
    k = torch.randint(0, len(LOSS_TIMESTEPS), (16,), generator=g)
    noise = torch.randn(m.shape, generator=g)
    for i in range(16):
        sigma = ddpm_sigma(LOSS_TIMESTEPS[int(k[i])])
        err = (target.eps(m[i : i + 1] + sigma * noise[i : i + 1], sigma, None) - noise[i : i + 1]).square().mean()
        torch.testing.assert_close(f[i, 0], err.log(), rtol=1e-5, atol=1e-6)
        assert f[i, 1:].tolist() == [float(j == int(k[i])) for j in range(len(LOSS_TIMESTEPS))]
    with pytest.raises(ValueError, match="unknown proxy feature"):
        proxy_features(target.eps, m, None, kind="pixels", sigma_dist=dist, generator=torch.Generator())


def test_proxy_attacker_on_the_loss_feature_learns_the_overfit_model(overfit):
    target, m, n = overfit
    sm, sn = proxy_scores(
        target, (m[:8], None, n[:8], None), (m[8:], None, n[8:], None), epochs=40, draws=4, lr=1e-3, feature="loss"
    )
    assert attack_metrics(sm, sn)["auc"] > 0.8
