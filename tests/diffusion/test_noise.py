import math

import pytest
import torch
from scipy import stats

from privdiff.diffusion import CosineLogSNRSigma, LogNormalSigma, make_sigma_distribution

N = 200_000


@pytest.mark.parametrize("P_mean,P_std", [(-1.2, 1.2), (0.5, 0.3)])
def test_lognormal_moments(P_mean, P_std):
    dist = LogNormalSigma(P_mean=P_mean, P_std=P_std)
    sigma = dist((N,), generator=torch.Generator().manual_seed(0))
    assert sigma.shape == (N,) and sigma.dtype == torch.float32 and (sigma > 0).all()
    log_sigma = sigma.double().log()
    # standard errors: mean P_std/√N, std P_std/√(2N); allow 5 of them
    assert abs(log_sigma.mean().item() - P_mean) < 5 * P_std / math.sqrt(N)
    assert abs(log_sigma.std().item() - P_std) < 5 * P_std / math.sqrt(2 * N)
    assert stats.kstest(log_sigma.numpy(), "norm", args=(P_mean, P_std)).pvalue > 1e-3


def test_lognormal_shape_and_generator():
    dist = LogNormalSigma()
    a = dist((3, 4), generator=torch.Generator().manual_seed(7))
    b = dist((3, 4), generator=torch.Generator().manual_seed(7))
    assert a.shape == (3, 4)
    assert torch.equal(a, b)


@pytest.mark.parametrize("logsnr_min,logsnr_max", [(-9.0, 13.0), (-4.0, 6.0)])
def test_cosine_logsnr_range_and_uniform_time(logsnr_min, logsnr_max):
    dist = CosineLogSNRSigma(logsnr_min=logsnr_min, logsnr_max=logsnr_max)
    sigma = dist((N,), generator=torch.Generator().manual_seed(1)).double()
    assert (sigma > 0).all()
    logsnr = -2 * sigma.log()
    # float32 output: allow a relative round-off of σ (≈ 2·6e-8 in logSNR)
    assert logsnr.min().item() >= logsnr_min - 1e-5
    assert logsnr.max().item() <= logsnr_max + 1e-5
    # the extremes are actually approached
    assert logsnr.min().item() < logsnr_min + 0.1
    assert logsnr.max().item() > logsnr_max - 0.5
    # t = (2/π)·atan(σ) is uniform on [t(logsnr_max), t(logsnr_min)]
    t = (2 / math.pi) * torch.atan(sigma)
    t_lo = (2 / math.pi) * math.atan(math.exp(-logsnr_max / 2))
    t_hi = (2 / math.pi) * math.atan(math.exp(-logsnr_min / 2))
    assert stats.kstest(t.numpy(), "uniform", args=(t_lo, t_hi - t_lo)).pvalue > 1e-3


def test_cosine_puts_more_mass_at_high_sigma_than_lognormal():
    g = torch.Generator().manual_seed(2)
    cos = CosineLogSNRSigma()((N,), generator=g)
    logn = LogNormalSigma()((N,), generator=g)
    assert (cos > 5).float().mean() > (logn > 5).float().mean()


def test_make_sigma_distribution():
    assert make_sigma_distribution("lognormal") == LogNormalSigma()
    assert make_sigma_distribution("lognormal", P_mean=0.0, P_std=1.0) == LogNormalSigma(0.0, 1.0)
    assert make_sigma_distribution("cosine", logsnr_min=-5.0) == CosineLogSNRSigma(logsnr_min=-5.0)
    with pytest.raises(ValueError, match="lognormal"):
        make_sigma_distribution("uniform")
    with pytest.raises(ValueError):
        CosineLogSNRSigma(logsnr_min=3.0, logsnr_max=1.0)
