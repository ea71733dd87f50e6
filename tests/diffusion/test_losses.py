import copy
import math
import warnings

import pytest
import torch

from privdiff.diffusion import Denoiser, LogNormalSigma, denoising_loss, draw_training_noise, drop_labels
from tests.helpers import RecordingNet, TinyNet

B, K, C, H, W = 4, 3, 2, 5, 5
NUM_CLASSES = 5
NULL = NUM_CLASSES


def _batch(seed: int = 0, K: int = K):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, C, H, W, generator=g) * 2 - 1
    labels = torch.randint(0, NUM_CLASSES, (B,), generator=g)
    sigma, noise = draw_training_noise(x0, K=K, sigma_dist=LogNormalSigma(), generator=g)
    return x0, labels, sigma, noise


def _slow_loss(den, x0, labels, sigma, noise):
    """One (example, draw) at a time: ℓ_b = mean_k λ(σ_bk)·mean (D(x0_b + σ_bk n_bk; σ_bk) − x0_b)²."""
    out = []
    for b in range(x0.shape[0]):
        per_draw = []
        for k in range(sigma.shape[1]):
            s = sigma[b, k].view(1)
            y = x0[b : b + 1]
            if labels is None:
                lab = None
            elif labels.ndim == 1:
                lab = labels[b : b + 1]
            else:
                lab = labels[b, k].view(1)
            D = den(y + s * noise[b, k][None], s, lab)
            per_draw.append(den.loss_weight(s) * (D - y).square().mean())
        out.append(torch.stack(per_draw).mean())
    return torch.stack(out).view(-1)


def test_draw_training_noise_shapes_and_reproducibility():
    x0 = torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(0))
    sigma, noise = draw_training_noise(x0, K=K, sigma_dist=LogNormalSigma(), generator=torch.Generator().manual_seed(1))
    assert sigma.shape == (B, K) and noise.shape == (B, K, C, H, W)
    assert noise.dtype == x0.dtype and (sigma > 0).all()
    sigma2, noise2 = draw_training_noise(
        x0, K=K, sigma_dist=LogNormalSigma(), generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(sigma, sigma2) and torch.equal(noise, noise2)
    with pytest.raises(ValueError):
        draw_training_noise(x0, K=0, sigma_dist=LogNormalSigma())


def test_noise_is_standard_normal():
    x0 = torch.zeros(64, 3, 8, 8).normal_(generator=torch.Generator().manual_seed(2))
    _, noise = draw_training_noise(x0, K=4, sigma_dist=LogNormalSigma(), generator=torch.Generator().manual_seed(3))
    n = noise.numel()
    assert abs(noise.mean().item()) < 5 / math.sqrt(n)
    assert abs(noise.std().item() - 1) < 5 / math.sqrt(2 * n)


@pytest.mark.parametrize("param", ["edm", "v"])
@pytest.mark.parametrize("label_kind", ["none", "per_example", "per_draw"])
def test_loss_matches_slow_loop(param, label_kind):
    torch.manual_seed(0)
    den = Denoiser(TinyNet(C, NUM_CLASSES), parameterization=param)
    x0, labels, sigma, noise = _batch(seed=1)
    if label_kind == "none":
        labels = None
    elif label_kind == "per_draw":
        labels = drop_labels(
            labels[:, None].expand(B, K), p=0.5, null_label=NULL, generator=torch.Generator().manual_seed(9)
        )
    loss = denoising_loss(den, x0, labels, sigma=sigma, noise=noise)
    assert loss.shape == (B,)
    torch.testing.assert_close(loss, _slow_loss(den, x0, labels, sigma, noise), rtol=1e-5, atol=1e-6)


def test_multiplicity_is_mean_of_single_draw_losses():
    torch.manual_seed(1)
    den = Denoiser(TinyNet(C, NUM_CLASSES))
    x0, labels, sigma, noise = _batch(seed=2, K=5)
    loss = denoising_loss(den, x0, labels, sigma=sigma, noise=noise)
    singles = torch.stack(
        [denoising_loss(den, x0, labels, sigma=sigma[:, k : k + 1], noise=noise[:, k : k + 1]) for k in range(5)]
    )
    torch.testing.assert_close(loss, singles.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_draw_labels", [False, True])
def test_row_ordering_contract(per_draw_labels):
    # row b*K + k of the single model batch is (example b, draw k): x_in = c_in(σ_bk)·(x0_b + σ_bk·n_bk)
    net = RecordingNet()
    den = Denoiser(net)
    x0, labels, sigma, noise = _batch(seed=3)
    if per_draw_labels:
        labels = torch.arange(B * K).view(B, K) % NUM_CLASSES
    denoising_loss(den, x0, labels, sigma=sigma, noise=noise)
    assert len(net.calls) == 1  # one forward of B·K rows
    x_in, c_noise, labels_seen = net.calls[0]
    assert x_in.shape == (B * K, C, H, W)
    for b in range(B):
        for k in range(K):
            row = b * K + k
            s = sigma[b, k]
            c_in = 1 / torch.sqrt(s**2 + den.sigma_data**2)
            torch.testing.assert_close(x_in[row], c_in * (x0[b] + s * noise[b, k]))
            torch.testing.assert_close(c_noise[row], 0.25 * torch.log(s))
            assert labels_seen[row] == (labels[b, k] if per_draw_labels else labels[b])


def _grads(loss: torch.Tensor, params):
    return torch.autograd.grad(loss, params)


def test_gradient_of_sum_is_sum_of_per_example_and_per_row_gradients():
    torch.manual_seed(2)
    den = Denoiser(TinyNet(C, NUM_CLASSES))
    params = list(den.parameters())
    x0, labels, sigma, noise = _batch(seed=4)
    total = _grads(denoising_loss(den, x0, labels, sigma=sigma, noise=noise).sum(), params)

    per_example = [torch.zeros_like(p) for p in params]
    per_row = [torch.zeros_like(p) for p in params]
    for b in range(B):
        sl = slice(b, b + 1)
        g_b = _grads(denoising_loss(den, x0[sl], labels[sl], sigma=sigma[sl], noise=noise[sl]).sum(), params)
        for acc, g in zip(per_example, g_b):
            acc += g
        for k in range(K):
            ks = slice(k, k + 1)
            # row gradient ∇(ℓ_bk / K)
            l_bk = denoising_loss(den, x0[sl], labels[sl], sigma=sigma[sl, ks], noise=noise[sl, ks]).sum()
            for acc, g in zip(per_row, _grads(l_bk / K, params)):
                acc += g
    for g_tot, g_ex, g_row in zip(total, per_example, per_row):
        torch.testing.assert_close(g_tot, g_ex, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g_tot, g_row, rtol=1e-4, atol=1e-6)


def test_opacus_row_gradients_fold_into_per_example_gradients():
    # the contract the privacy code relies on: per-row grad samples of the B·K-row batch,
    # summed over rows b*K .. b*K+K-1, equal example b's gradient of ℓ_b
    opacus = pytest.importorskip("opacus")
    torch.manual_seed(3)
    den = Denoiser(TinyNet(C, NUM_CLASSES))
    reference = copy.deepcopy(den)  # un-hooked twin for the per-example reference gradients
    gsm = opacus.GradSampleModule(den, loss_reduction="sum")
    x0, labels, sigma, noise = _batch(seed=5)
    loss = denoising_loss(gsm, x0, labels, sigma=sigma, noise=noise, loss_weight=den.loss_weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "full backward hook ... no inputs require gradients"
        loss.sum().backward()
    ref_params = dict(reference.named_parameters())
    for name, p in den.named_parameters():
        assert p.grad_sample.shape == (B * K, *p.shape)
        folded = p.grad_sample.view(B, K, *p.shape).sum(1)
        for b in range(B):
            sl = slice(b, b + 1)
            l_b = denoising_loss(reference, x0[sl], labels[sl], sigma=sigma[sl], noise=noise[sl]).sum()
            (g,) = torch.autograd.grad(l_b, [ref_params[name]])
            torch.testing.assert_close(folded[b], g, rtol=1e-4, atol=1e-6, msg=name)


def test_loss_validates_shapes():
    den = Denoiser(TinyNet(C, NUM_CLASSES))
    x0, labels, sigma, noise = _batch(seed=6)
    with pytest.raises(ValueError):
        denoising_loss(den, x0, labels, sigma=sigma.view(-1), noise=noise)
    with pytest.raises(ValueError):
        denoising_loss(den, x0, labels, sigma=sigma, noise=noise[:, :1])
    with pytest.raises(ValueError):
        denoising_loss(den, x0, labels[:2], sigma=sigma, noise=noise)


def test_drop_labels_rate_and_shape():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, NUM_CLASSES, (200, 500), generator=g)
    p = 0.3
    out = drop_labels(labels, p=p, null_label=NULL, generator=g)
    assert out.shape == labels.shape and out.dtype == labels.dtype
    dropped = out == NULL
    n = labels.numel()
    assert abs(dropped.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    # kept entries are unchanged, the input is not modified
    assert torch.equal(out[~dropped], labels[~dropped])
    assert not (labels == NULL).any()


def test_drop_labels_edge_cases():
    labels = torch.randint(0, NUM_CLASSES, (7,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(drop_labels(labels, p=0.0, null_label=NULL), labels)
    assert (drop_labels(labels, p=1.0, null_label=NULL) == NULL).all()
    a = drop_labels(labels, p=0.5, null_label=NULL, generator=torch.Generator().manual_seed(2))
    b = drop_labels(labels, p=0.5, null_label=NULL, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        drop_labels(labels, p=1.5, null_label=NULL)
