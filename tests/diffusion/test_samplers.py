import math

import pytest
import torch

from privdiff.diffusion import (
    SAMPLERS,
    Denoiser,
    guided_denoiser,
    karras_sigmas,
    sample,
    sample_euler,
    sample_heun,
)
from tests.helpers import GaussianDenoiser, RecordingNet, TinyNet

MU, S = 0.3, 0.5
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


# ----------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("n", [1, 2, 8, 18, 64])
def test_karras_sigmas_properties(n):
    sigmas = karras_sigmas(n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=7.0)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (n + 1,)
    assert sigmas[0].item() == SIGMA_MAX and sigmas[-1].item() == 0.0
    if n > 1:
        assert sigmas[-2].item() == SIGMA_MIN
    assert (sigmas[1:] < sigmas[:-1]).all()


def test_karras_sigmas_match_eq5():
    n, rho = 10, 7.0
    sigmas = karras_sigmas(n, sigma_min=0.01, sigma_max=50.0, rho=rho)
    for i in range(n):
        expected = (50.0 ** (1 / rho) + i / (n - 1) * (0.01 ** (1 / rho) - 50.0 ** (1 / rho))) ** rho
        assert sigmas[i].item() == pytest.approx(expected, rel=1e-12)
    # ρ = 1 is a linear schedule
    torch.testing.assert_close(
        karras_sigmas(4, sigma_min=1.0, sigma_max=4.0, rho=1.0),
        torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0], dtype=torch.float64),
    )
    with pytest.raises(ValueError):
        karras_sigmas(0)


# ----------------------------------------------------------------------------- exact Gaussian


def _x_T(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=dtype) * SIGMA_MAX


def _discrete_limit(den: GaussianDenoiser, x_T: torch.Tensor) -> torch.Tensor:
    """N → ∞ limit of a sampler on the Karras grid: exact ODE down to σ_min, then x = D(x; σ_min)."""
    x_min = den.ode_solution(x_T, sigma_max=SIGMA_MAX, sigma=SIGMA_MIN)
    return den(x_min, torch.full((x_T.shape[0],), SIGMA_MIN, dtype=x_T.dtype))


def test_gaussian_denoiser_ode_solution_is_consistent():
    # sanity of the fixture: dx/dσ = (x − D)/σ holds for x(σ) = mu + √(s²+σ²)/√(s²+σ_max²)·(x_T − mu)
    den = GaussianDenoiser(MU, S)
    x_T = _x_T(16, seed=0, dtype=torch.float64)
    sigma, h = 1.7, 1e-6
    x_plus = den.ode_solution(x_T, sigma_max=SIGMA_MAX, sigma=sigma + h)
    x_minus = den.ode_solution(x_T, sigma_max=SIGMA_MAX, sigma=sigma - h)
    dx = (x_plus - x_minus) / (2 * h)
    x = den.ode_solution(x_T, sigma_max=SIGMA_MAX, sigma=sigma)
    torch.testing.assert_close(dx, (x - den(x, torch.full((16,), sigma, dtype=torch.float64))) / sigma)


def test_heun_64_steps_matches_exact_ode_solution():
    den = GaussianDenoiser(MU, S)
    x_T = _x_T(2048, seed=1)
    out = sample_heun(den, x_T.clone(), karras_sigmas(64))
    exact = den.ode_solution(x_T.double(), sigma_max=SIGMA_MAX)  # x_0 = mu + s/√(s²+σ_max²)·(x_T − mu)
    assert out.dtype == torch.float32
    # Heun at N = 64 is within 0.5 % of the exact contraction factor s/√(s²+σ_max²) (measured 0.37 %)
    err = (out.double() - exact).abs()
    assert (err <= 5e-3 * (exact - MU).abs() + 1e-4).all(), err.max()
    assert err.max() < 1e-2


@pytest.mark.parametrize(
    "sampler,order,tol",
    [(sample_heun, 2.0, 0.3), (sample_euler, 1.0, 0.15)],
    ids=["heun", "euler"],
)
def test_convergence_order(sampler, order, tol):
    den = GaussianDenoiser(MU, S)
    x_T = _x_T(64, seed=2, dtype=torch.float64)  # float64 so round-off does not hide the truncation error
    target = _discrete_limit(den, x_T)
    steps = [16, 32, 64, 128]
    errors = [(sampler(den, x_T.clone(), karras_sigmas(n)) - target).abs().max().item() for n in steps]
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])), errors
    observed = [math.log2(e1 / e2) for e1, e2 in zip(errors, errors[1:])]
    assert all(abs(p - order) < tol for p in observed), observed


def test_euler_converges_to_exact_solution():
    den = GaussianDenoiser(MU, S)
    x_T = _x_T(256, seed=3, dtype=torch.float64)
    exact = den.ode_solution(x_T, sigma_max=SIGMA_MAX)
    err = [(sample_euler(den, x_T.clone(), karras_sigmas(n)) - exact).abs().max().item() for n in (32, 256, 2048)]
    assert err[0] > err[1] > err[2]
    assert err[2] < 3e-3


def test_heun_with_churn_samples_the_data_distribution():
    # the stochastic sampler (EDM Alg. 2) must still produce N(mu, s²); 256 steps keep the
    # discretization bias (≈ 0.005 in the std) below the statistical tolerance
    n = 20_000
    den = GaussianDenoiser(MU, S)
    out = sample(
        den,
        shape=(n,),
        sampler="heun",
        steps=256,
        generator=torch.Generator().manual_seed(0),
        S_churn=40.0,
        S_min=0.05,
        S_max=50.0,
        S_noise=1.0,
    )
    se_mean, se_std = S / math.sqrt(n), S / math.sqrt(2 * n)
    assert abs(out.mean().item() - MU) < 4 * se_mean
    assert abs(out.std().item() - S) < 4 * se_std


def test_churn_uses_generator_and_window():
    den = GaussianDenoiser(MU, S)
    sigmas = karras_sigmas(16)
    x_T = _x_T(32, seed=4)

    def run(seed, **kw):
        return sample_heun(den, x_T.clone(), sigmas, generator=torch.Generator().manual_seed(seed), **kw)

    deterministic = run(0)
    churned = run(0, S_churn=10.0)
    assert torch.equal(churned, run(0, S_churn=10.0))  # reproducible
    assert not torch.allclose(churned, deterministic)
    assert not torch.allclose(churned, run(1, S_churn=10.0))
    # an empty [S_min, S_max] window means γ = 0 everywhere
    assert torch.equal(run(0, S_churn=10.0, S_min=100.0, S_max=200.0), deterministic)


@pytest.mark.parametrize("name,nfe", [("euler", 10), ("heun", 19)])
def test_nfe_callback_and_last_step_returns_denoised(name, nfe):
    den = GaussianDenoiser(MU, S)
    seen = []
    out = SAMPLERS[name](den, _x_T(8, seed=5), karras_sigmas(10), callback=seen.append)
    assert den.calls == nfe  # heun: 2N − 1 evaluations (no correction on the step to σ = 0)
    assert [d["i"] for d in seen] == list(range(10))
    assert {"i", "x", "sigma", "denoised"} <= set(seen[0])
    assert seen[0]["sigma"].item() == SIGMA_MAX
    assert torch.equal(out, seen[-1]["denoised"])


# ----------------------------------------------------------------------------- sample()


def test_sample_dispatch_aliases_and_errors():
    den = GaussianDenoiser(MU, S)

    def run(sampler, **kw):
        return sample(
            den, shape=(2, 1, 3, 3), sampler=sampler, steps=6, generator=torch.Generator().manual_seed(0), **kw
        )

    assert torch.equal(run("ddim"), run("euler"))
    assert torch.equal(run("edm"), run("heun"))
    assert not torch.equal(run("heun", S_churn=5.0), run("heun"))  # sampler kwargs are forwarded
    assert torch.equal(run("euler", S_churn=5.0), run("euler"))  # ... and ignored by euler
    with pytest.raises(ValueError, match="heun"):
        run("dpm++")
    assert set(SAMPLERS) == {"euler", "ddim", "heun", "edm"}


def test_sample_initial_noise_and_no_clamp():
    mu = 3.0  # data far outside [-1, 1]: the samplers must not clamp
    den = GaussianDenoiser(mu, S)
    seen = []
    out = sample(
        den,
        shape=(4096,),
        sampler="heun",
        steps=8,
        sigma_max=40.0,
        generator=torch.Generator().manual_seed(1),
        callback=seen.append,
        progress=True,
    )
    x0 = seen[0]["x"]
    assert x0.dtype == torch.float32
    assert abs(x0.std().item() - 40.0) < 40.0 * 5 / math.sqrt(2 * 4096)
    assert out.shape == (4096,) and out.max() > 4.0 and abs(out.mean().item() - mu) < 0.1


# Pinned results (diffusers-style regression values): sample() with generator seed 0, shape
# (2, 1, 4, 4), 8 steps, the exact Gaussian denoiser mu = 0.3, s = 0.5, σ ∈ [0.002, 80].
# Computed once with this implementation (torch 2.13 CPU). They catch silent changes of the
# schedule, the step formulas, the order of RNG draws or the dtype handling; the values
# themselves are only as right as the other tests in this file make them.
PINNED = {
    ("heun", 0.0): 9.663389,  # deterministic Heun (EDM Alg. 1)
    ("euler", 0.0): 9.630266,  # Euler / DDIM
    ("heun", 10.0): 9.508695,  # EDM Alg. 2 with churn (γ = 10/8 capped at √2 − 1)
}


@pytest.mark.parametrize("sampler,S_churn", list(PINNED))
def test_pinned_results(sampler, S_churn):
    out = sample(
        GaussianDenoiser(MU, S),
        shape=(2, 1, 4, 4),
        sampler=sampler,
        steps=8,
        generator=torch.Generator().manual_seed(0),
        S_churn=S_churn,
    )
    assert abs(out.sum().item() - PINNED[(sampler, S_churn)]) < 1e-3, out.sum().item()


# ----------------------------------------------------------------------------- guidance


def _cond_denoiser(seed: int = 0):
    torch.manual_seed(seed)
    return Denoiser(TinyNet(channels=2, num_classes=5))


def test_guided_denoiser_w0_is_plain_conditional_call():
    den = _cond_denoiser()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g)
    sigma = torch.rand(3, generator=g) + 0.1
    labels = torch.tensor([0, 4, 2])
    torch.testing.assert_close(guided_denoiser(den, labels)(x, sigma), den(x, sigma, labels), rtol=0, atol=0)
    torch.testing.assert_close(guided_denoiser(den, None, guidance=2.0)(x, sigma), den(x, sigma, None), rtol=0, atol=0)


@pytest.mark.parametrize("w", [0.5, 2.0, -0.3])
def test_guided_denoiser_formula(w):
    den = _cond_denoiser(1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 4, 4, generator=g)
    sigma = torch.rand(3, generator=g) + 0.1
    labels = torch.tensor([1, 3, 0])
    null = torch.full_like(labels, 5)
    expected = (1 + w) * den(x, sigma, labels) - w * den(x, sigma, null)
    torch.testing.assert_close(
        guided_denoiser(den, labels, guidance=w, null_label=5)(x, sigma), expected, rtol=1e-5, atol=1e-6
    )


def test_guided_denoiser_single_batched_forward():
    net = RecordingNet()
    den = Denoiser(net)
    labels = torch.tensor([1, 2, 3])
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    guided_denoiser(den, labels, guidance=1.5, null_label=9)(x, torch.full((3,), 0.7))
    assert len(net.calls) == 1
    x_in, c_noise, labels_seen = net.calls[0]
    assert x_in.shape[0] == 6 and c_noise.shape == (6,)
    assert labels_seen.tolist() == [1, 2, 3, 9, 9, 9]
    with pytest.raises(ValueError):
        guided_denoiser(den, labels, guidance=1.0)


def test_sample_with_guided_network_end_to_end():
    den = _cond_denoiser(2)
    labels = torch.tensor([0, 1, 2, 3])
    for sampler in ("euler", "heun"):
        out = sample(
            guided_denoiser(den, labels, guidance=1.0, null_label=5),
            shape=(4, 2, 4, 4),
            sampler=sampler,
            steps=4,
            generator=torch.Generator().manual_seed(0),
            S_churn=1.0,
        )
        assert out.shape == (4, 2, 4, 4) and out.dtype == torch.float32 and torch.isfinite(out).all()
