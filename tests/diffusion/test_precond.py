import math

import pytest
import torch

from privdiff.diffusion import Denoiser
from tests.helpers import RecordingNet, TinyNet

SIGMA_DATA = math.sqrt(1.0 / 3.0)


def _random_sigma(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 2.0 - 1.0)


def test_default_sigma_data_is_uniform_std():
    den = Denoiser(TinyNet())
    assert den.sigma_data == pytest.approx(SIGMA_DATA)
    assert den.parameterization == "edm"


@pytest.mark.parametrize("sigma_data", [SIGMA_DATA, 0.5])
def test_edm_scalings_match_table1(sigma_data):
    den = Denoiser(TinyNet(), sigma_data=sigma_data, parameterization="edm")
    sigma = _random_sigma(64)
    c_skip, c_out, c_in, c_noise = den.scalings(sigma)
    s, sd = sigma.numpy(), sigma_data
    torch.testing.assert_close(c_skip.numpy(), sd**2 / (s**2 + sd**2))
    torch.testing.assert_close(c_out.numpy(), s * sd / (s**2 + sd**2) ** 0.5)
    torch.testing.assert_close(c_in.numpy(), 1.0 / (s**2 + sd**2) ** 0.5)
    torch.testing.assert_close(c_noise.numpy(), 0.25 * torch.log(sigma).numpy())
    for c in (c_skip, c_out, c_in, c_noise):
        assert c.shape == sigma.shape and c.dtype == torch.float64


@pytest.mark.parametrize("sigma_data", [SIGMA_DATA, 0.5])
def test_v_scalings(sigma_data):
    den = Denoiser(TinyNet(), sigma_data=sigma_data, parameterization="v")
    sigma = _random_sigma(64, seed=1)
    c_skip, c_out, c_in, c_noise = den.scalings(sigma)
    s, sd = sigma.numpy(), sigma_data
    torch.testing.assert_close(c_skip.numpy(), sd**2 / (s**2 + sd**2))
    torch.testing.assert_close(c_out.numpy(), -s * sd / (s**2 + sd**2) ** 0.5)
    torch.testing.assert_close(c_in.numpy(), 1.0 / (s**2 + sd**2) ** 0.5)
    torch.testing.assert_close(c_noise, (2 / math.pi) * torch.atan(sigma / sd))
    assert ((c_noise > 0) & (c_noise < 1)).all()


def test_known_values_at_sigma_equal_sigma_data():
    # at σ = σd: c_skip = 1/2, |c_out| = σd/√2, c_in = 1/(σd√2); v: c_noise = (2/π)·atan(1) = 1/2
    sd = 0.5
    sigma = torch.tensor([sd], dtype=torch.float64)
    for param, sign, c_noise_val in (("edm", 1.0, 0.25 * math.log(sd)), ("v", -1.0, 0.5)):
        c_skip, c_out, c_in, c_noise = Denoiser(TinyNet(), sigma_data=sd, parameterization=param).scalings(sigma)
        assert c_skip.item() == pytest.approx(0.5)
        assert c_out.item() == pytest.approx(sign * sd / math.sqrt(2))
        assert c_in.item() == pytest.approx(1 / (sd * math.sqrt(2)))
        assert c_noise.item() == pytest.approx(c_noise_val)


@pytest.mark.parametrize("param", ["edm", "v"])
def test_loss_weight_is_inverse_c_out_squared(param):
    den = Denoiser(TinyNet(), parameterization=param)
    sigma = _random_sigma(100, seed=2)
    _, c_out, _, _ = den.scalings(sigma)
    torch.testing.assert_close(den.loss_weight(sigma) * c_out**2, torch.ones_like(sigma))
    sd = den.sigma_data
    torch.testing.assert_close(den.loss_weight(sigma), (sigma**2 + sd**2) / (sigma * sd) ** 2)


@pytest.mark.parametrize("param", ["edm", "v"])
def test_forward_with_linear_net_matches_closed_form(param):
    # F = a·x_in + b·c_noise + 0.1·label  =>  D = c_skip·x + c_out·(a·c_in·x + b·c_noise + 0.1·label)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, 4, 4, generator=g)
    sigma = torch.rand(6, generator=g) * 5 + 0.01
    labels = torch.randint(0, 5, (6,), generator=g)
    net = RecordingNet(a=0.7, b=-0.4)
    den = Denoiser(net, sigma_data=0.6, parameterization=param)
    out = den(x, sigma, labels)

    s, sd, x64 = sigma.double().view(-1, 1, 1, 1), 0.6, x.double()
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = (1 if param == "edm" else -1) * s * sd / (s**2 + sd**2).sqrt()
    c_in = 1 / (s**2 + sd**2).sqrt()
    c_noise = 0.25 * s.log() if param == "edm" else (2 / math.pi) * torch.atan(s / sd)
    expected = c_skip * x64 + c_out * (0.7 * c_in * x64 - 0.4 * c_noise + 0.1 * labels.double().view(-1, 1, 1, 1))
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # the net saw c_in·x and c_noise of shape [B]
    x_in, c_noise_seen, labels_seen = net.calls[-1]
    torch.testing.assert_close(x_in.double(), c_in * x64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c_noise_seen.double(), c_noise.view(-1), rtol=1e-6, atol=1e-6)
    assert c_noise_seen.shape == (6,) and c_noise_seen.dtype == torch.float32
    assert torch.equal(labels_seen, labels)


def test_forward_identity_net_at_sigma_data():
    # F = x_in, σ = σd:  D = ½x + (σd/√2)·x/(σd√2) = x
    net = RecordingNet(a=1.0, b=0.0)
    den = Denoiser(net, sigma_data=0.5)
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(den(x, torch.full((3,), 0.5)), x)


def test_scalar_and_float64_sigma_broadcast():
    den = Denoiser(TinyNet())
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 2, 5, 5, generator=g)
    labels = torch.randint(0, 5, (4,), generator=g)
    ref = den(x, torch.full((4,), 1.3), labels)
    torch.testing.assert_close(den(x, torch.tensor(1.3, dtype=torch.float64), labels), ref)
    torch.testing.assert_close(den(x, 1.3, labels), ref)
    torch.testing.assert_close(den(x, torch.full((4,), 1.3, dtype=torch.float64), labels), ref)
    with pytest.raises(ValueError):
        den(x, torch.ones(3), labels)


def test_module_has_no_buffers_or_own_parameters():
    net = TinyNet()
    den = Denoiser(net, parameterization="v")
    assert list(den.buffers()) == []
    assert dict(den.named_parameters(recurse=False)) == {}
    assert dict(den.named_buffers(recurse=False)) == {}
    assert {id(p) for p in den.parameters()} == {id(p) for p in net.parameters()}


def test_invalid_arguments():
    with pytest.raises(ValueError):
        Denoiser(TinyNet(), parameterization="eps")
    with pytest.raises(ValueError):
        Denoiser(TinyNet(), sigma_data=0.0)
