"""Per-sample gradients of the training UNet, checked against one example at a time.

The model is built exactly as training builds it: ``Denoiser(UNetNet(build_unet(...)))`` with
attention blocks (diffusers' attention ends in ``transpose(...).reshape(...)``, so the
convolutions after it see non-contiguous activations), wrapped by ``make_grad_sample_module``,
fed the DPDM loss with K noise draws per example and folded over K. The reference is the
obvious one: a plain copy of the model with the same weights, one example at a time,
``p.grad`` of that example's loss.

Relative error of a parameter = max |per-sample - reference| / max |reference| over the batch.
Attention ``to_k.bias`` has an analytically zero gradient (softmax is invariant to a constant
shift per query), so its reference is round-off; those are the only parameters skipped.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn

from privdiff.diffusion import Denoiser, LogNormalSigma, denoising_loss, draw_training_noise, drop_labels
from privdiff.models.unet import UNetConfig, UNetNet, build_unet
from privdiff.privacy.dpsgd import fold_noise_multiplicity
from privdiff.privacy.grad_sample import (
    install_contiguous_conv_grad_samplers,
    make_grad_sample_module,
    per_sample_grads,
)

CFG = UNetConfig(channels=(16, 32), layers_per_block=1, attention_levels=(1,), norm_num_groups=8, attention_head_dim=8)
RESOLUTION = 8
BATCH = 4
NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES  # the CFG null label of build_unet
TOL = 1e-4  # relative error allowed per parameter (observed: ~3e-6)


# -- helpers -----------------------------------------------------------------------------------


def build_denoiser(seed: int = 0, in_channels: int = 1) -> Denoiser:
    """The training model, with every weight moved off its (often 0 or 1) initial value."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        den = Denoiser(
            UNetNet(build_unet(CFG, resolution=RESOLUTION, in_channels=in_channels, num_classes=NUM_CLASSES))
        )
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in den.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return den


def plain_copy(den: Denoiser, in_channels: int = 1) -> Denoiser:
    """A fresh, unwrapped model with the same weights (built before ``den`` is wrapped)."""
    ref = build_denoiser(seed=12345, in_channels=in_channels)
    ref.load_state_dict(den.state_dict())
    return ref


def draw_batch(seed: int, K: int, in_channels: int = 1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(BATCH, in_channels, RESOLUTION, RESOLUTION, generator=g) * 2 - 1
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
    sigma, noise = draw_training_noise(x0, K=K, sigma_dist=LogNormalSigma(), generator=g)
    return x0, labels, sigma, noise


def private_grads(gsm, den, x0, labels, sigma, noise, K) -> dict[str, torch.Tensor]:
    """The training path: one B·K-row backward of the summed loss, then fold over K."""
    loss = denoising_loss(gsm, x0, labels, sigma=sigma, noise=noise, loss_weight=den.loss_weight)
    assert loss.shape == (x0.shape[0],)
    loss.sum().backward()
    fold_noise_multiplicity(gsm, K)
    return {name: g.detach().clone() for name, g in per_sample_grads(gsm).items()}


def reference_grads(ref: Denoiser, x0, labels, sigma, noise) -> dict[str, torch.Tensor]:
    """Slow and obvious: each example alone through a plain model, ``p.grad`` of its loss."""
    rows: dict[str, list[torch.Tensor]] = {name: [] for name, _ in ref.named_parameters()}
    for b in range(x0.shape[0]):
        ref.zero_grad(set_to_none=True)
        lab = None if labels is None else labels[b : b + 1]
        denoising_loss(ref, x0[b : b + 1], lab, sigma=sigma[b : b + 1], noise=noise[b : b + 1]).sum().backward()
        for name, p in ref.named_parameters():
            rows[name].append(torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
    return {name: torch.stack(r) for name, r in rows.items()}


def relative_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]):
    """Per-parameter relative error, and the parameters whose reference is ~0 (skipped)."""
    assert set(got) == set(want), f"parameters without per-sample gradients: {set(want) - set(got)}"
    scale = max(float(w.abs().max()) for w in want.values())
    assert scale > 0
    errors, skipped = {}, []
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape, f"{name}: {tuple(g.shape)} vs {tuple(w.shape)}"
        w_max = float(w.abs().max())
        if w_max <= 1e-6 * scale:
            skipped.append(name)
            # still a check: the per-sample gradient of a zero-gradient parameter is ~0 too
            assert float(g.abs().max()) <= 1e-5 * scale, name
            continue
        errors[name] = float((g - w).abs().max()) / w_max
    return errors, skipped


def num_attention_blocks(den: nn.Module) -> int:
    return sum(isinstance(m, Attention) for m in den.modules())


def assert_matches(got, want, den) -> None:
    errors, skipped = relative_errors(got, want)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{worst}: relative error {errors[worst]:.3g}"
    assert all(name.endswith("to_k.bias") for name in skipped), skipped
    assert len(skipped) <= num_attention_blocks(den), skipped
    assert len(errors) >= 0.9 * len(want)  # nearly every parameter was actually compared


def record_noncontiguous_conv_inputs(den: nn.Module) -> set[str]:
    """Names of the Conv2d modules whose input is non-contiguous (filled during forward)."""
    seen: set[str] = set()
    for name, m in den.named_modules():
        if isinstance(m, nn.Conv2d):

            def hook(_m, inputs, name=name):
                if not inputs[0].is_contiguous():
                    seen.add(name)

            m.register_forward_pre_hook(hook)
    return seen


# -- the fix is what the training path uses ---------------------------------------------------


def test_privdiff_conv_samplers_installed_and_idempotent():
    make_grad_sample_module(nn.Conv2d(1, 1, 1))
    install_contiguous_conv_grad_samplers()  # again: must not wrap twice
    for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        sampler = GradSampleModule.GRAD_SAMPLERS[conv]
        assert getattr(sampler, "__privdiff_contiguous__", False)
        assert sampler.__wrapped__ is compute_conv_grad_sample  # one level of wrapping, around the stock one


def test_make_grad_sample_module_rejects():
    with pytest.raises(ValueError, match="grad_sample_mode"):
        make_grad_sample_module(nn.Linear(2, 2), grad_sample_mode="ew")
    with pytest.raises(ValueError, match="DP-SGD"):
        make_grad_sample_module(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)))


def test_fold_rejects_rows_not_multiple_of_K():
    lin = nn.Linear(3, 2)
    gsm = make_grad_sample_module(lin)
    gsm(torch.randn(4, 3, generator=torch.Generator().manual_seed(0))).sum().backward()
    with pytest.raises(RuntimeError, match="multiple of K=3"):
        fold_noise_multiplicity(gsm, 3)


# -- the UNet, as trained ----------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_unet_per_sample_gradients_match_one_at_a_time(mode, K):
    den = build_denoiser(seed=1)
    ref = plain_copy(den)
    noncontiguous = record_noncontiguous_conv_inputs(den)
    x0, labels, sigma, noise = draw_batch(seed=10 + K, K=K)
    gsm = make_grad_sample_module(den, grad_sample_mode=mode)
    got = private_grads(gsm, den, x0, labels, sigma, noise, K)
    assert all(g.shape[0] == BATCH for g in got.values())  # folded: one row per example, not B·K
    want = reference_grads(ref, x0, labels, sigma, noise)
    assert_matches(got, want, den)
    # the model really exercises the non-contiguous path (mid block and first up block convs)
    assert len(noncontiguous) >= 2, noncontiguous
    assert any(name.startswith("net.unet.mid_block") for name in noncontiguous)


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
@pytest.mark.parametrize("layout", ["channels_last", "permuted"])
def test_unet_non_contiguous_input(layout, mode):
    in_channels, K = 3, 2  # 3 channels so that channels_last / permuted inputs really have odd strides
    den = build_denoiser(seed=2, in_channels=in_channels)
    ref = plain_copy(den, in_channels=in_channels)
    x0, labels, sigma, noise = draw_batch(seed=20, K=K, in_channels=in_channels)
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    else:
        x0 = x0.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # same values, NHWC storage
    assert not x0.is_contiguous()
    gsm = make_grad_sample_module(den, grad_sample_mode=mode)
    got = private_grads(gsm, den, x0, labels, sigma, noise, K)
    want = reference_grads(ref, x0.contiguous(), labels, sigma, noise)
    assert_matches(got, want, den)


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_unet_in_channels_last_memory_format(mode):
    """A channels_last model: every convolution after the first sees a non-contiguous input."""
    K = 2
    den = build_denoiser(seed=3)
    ref = plain_copy(den)
    den.to(memory_format=torch.channels_last)
    noncontiguous = record_noncontiguous_conv_inputs(den)
    x0, labels, sigma, noise = draw_batch(seed=30, K=K)
    gsm = make_grad_sample_module(den, grad_sample_mode=mode)
    got = private_grads(gsm, den, x0, labels, sigma, noise, K)
    assert len(noncontiguous) >= 10, noncontiguous
    assert_matches(got, reference_grads(ref, x0, labels, sigma, noise), den)


@pytest.mark.parametrize("K", [1, 3])
def test_unet_null_labels_cfg(K):
    """Classifier-free guidance training: labels dropped to the null label (all, or per draw)."""
    den = build_denoiser(seed=4)
    ref = plain_copy(den)
    x0, labels, sigma, noise = draw_batch(seed=40 + K, K=K)
    if K == 1:
        labels = torch.full_like(labels, NULL_LABEL)
    else:  # per-draw labels [B, K], about half dropped
        labels = drop_labels(
            labels[:, None].expand(BATCH, K).contiguous(),
            p=0.5,
            null_label=NULL_LABEL,
            generator=torch.Generator().manual_seed(41),
        )
        assert (labels == NULL_LABEL).any() and (labels != NULL_LABEL).any()
    gsm = make_grad_sample_module(den, grad_sample_mode="hooks")
    got = private_grads(gsm, den, x0, labels, sigma, noise, K)
    want = reference_grads(ref, x0, labels, sigma, noise)
    assert_matches(got, want, den)
    # the null label's embedding row gets a gradient from exactly the examples that used it
    emb = "net.unet.class_embedding.weight"
    uses_null = (labels == NULL_LABEL).reshape(BATCH, -1).any(dim=1)
    null_row = got[emb][:, NULL_LABEL].abs().amax(dim=1)
    assert torch.equal(null_row > 0, uses_null)


# -- the bug is real, and the fix is what cures it ---------------------------------------------


def stock_conv2d_sampler():
    """Context: Opacus' own Conv2d sampler (no contiguity fix) for the duration of the block."""

    class _Stock:
        def __enter__(self):
            install_contiguous_conv_grad_samplers()
            self.fixed = GradSampleModule.GRAD_SAMPLERS[nn.Conv2d]
            assert self.fixed.__wrapped__ is compute_conv_grad_sample
            GradSampleModule.GRAD_SAMPLERS[nn.Conv2d] = compute_conv_grad_sample

        def __exit__(self, *exc):
            GradSampleModule.GRAD_SAMPLERS[nn.Conv2d] = self.fixed
            return False

    return _Stock()


def test_stock_opacus_conv_sampler_is_wrong_after_attention():
    K = 1
    den = build_denoiser(seed=5)
    ref = plain_copy(den)
    noncontiguous = record_noncontiguous_conv_inputs(den)
    x0, labels, sigma, noise = draw_batch(seed=50, K=K)
    gsm = make_grad_sample_module(den, grad_sample_mode="hooks")
    try:
        with stock_conv2d_sampler():
            got = private_grads(gsm, den, x0, labels, sigma, noise, K)
    finally:
        assert getattr(GradSampleModule.GRAD_SAMPLERS[nn.Conv2d], "__privdiff_contiguous__", False)
    want = reference_grads(ref, x0, labels, sigma, noise)
    errors, _ = relative_errors(got, want)
    wrong = {name for name, e in errors.items() if e > 0.5}
    # exactly the weights of the convolutions fed by non-contiguous activations are wrong ...
    assert noncontiguous, "no convolution saw a non-contiguous input: the test would prove nothing"
    assert wrong == {f"{name}.weight" for name in noncontiguous}
    assert any(float(got[name].abs().max()) == 0.0 for name in wrong)  # silently all zero
    # ... while everything else (and p.grad, which training would not notice) stays right
    assert max(e for name, e in errors.items() if name not in wrong) <= TOL
    # the same model and batch with the privdiff sampler is right everywhere
    den2 = build_denoiser(seed=5)
    gsm2 = make_grad_sample_module(den2, grad_sample_mode="hooks")
    assert_matches(private_grads(gsm2, den2, x0, labels, sigma, noise, K), want, den2)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
def test_single_conv_layout(layout):
    """The minimal repro (ecosystem.md §1.2): one Conv2d, per-sample vs one-at-a-time."""
    g = torch.Generator().manual_seed(60)
    conv = nn.Conv2d(4, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
    x = torch.randn(2, 4, 8, 8, generator=g)
    target = torch.randn(2, 3, 8, 8, generator=g)
    if layout == "channels_last":
        x_in = x.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":
        x_in = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    else:
        x_in = x
    assert x_in.is_contiguous() == (layout == "contiguous")

    want = []
    for b in range(2):
        conv.zero_grad(set_to_none=True)
        ((conv(x[b : b + 1]) - target[b : b + 1]) ** 2).sum().backward()
        want.append(conv.weight.grad.clone())
    want = torch.stack(want)

    def per_sample(stock: bool) -> torch.Tensor:
        c = nn.Conv2d(4, 3, 3, padding=1)
        c.load_state_dict(conv.state_dict())
        gsm = make_grad_sample_module(c)
        if stock:
            with stock_conv2d_sampler():
                ((gsm(x_in) - target) ** 2).sum().backward()
        else:
            ((gsm(x_in) - target) ** 2).sum().backward()
        return c.weight.grad_sample

    def rel(got):
        return float((got - want).abs().max() / want.abs().max())

    assert rel(per_sample(stock=False)) <= 1e-5
    if layout == "contiguous":
        assert rel(per_sample(stock=True)) <= 1e-5
    else:
        assert rel(per_sample(stock=True)) > 0.1  # Opacus' im2col reads the wrong elements


# -- the exact model each shipped recipe trains ---------------------------------------------------


def _shipped_recipes():
    from importlib import resources

    folder = resources.files("privdiff") / "recipes"
    return sorted(str(folder / p.name) for p in folder.iterdir() if p.name.endswith(".yaml"))


@pytest.mark.parametrize("recipe_path", _shipped_recipes(), ids=lambda p: p.rsplit("/", 1)[-1])
def test_shipped_recipe_model_per_sample_gradients(recipe_path):
    """The UNet a shipped recipe trains (same builder, preconditioning, resolution and mode as
    ``train_denoiser``), channels-last input, K = 2: per-sample gradients equal one-at-a-time ones."""
    from privdiff.config import resolve_recipe
    from privdiff.core.denoisers import make_denoiser

    r = resolve_recipe(recipe_path)
    if not r.privacy.enabled:
        pytest.skip("non-private recipe: no per-sample gradients")
    if r.method == "dp-finetune":
        pytest.skip(
            "dp-finetune trains the user's own pretrained UNet: checked on real diffusers blocks in tests/models/test_pretrained.py"
        )
    if r.method not in ("dpdm", "dpp"):
        pytest.skip(
            f"{r.method} trains a latent model, checked in its own tests (tests/methods/test_dp_ldm.py, tests/models/test_he_net.py)"
        )
    res = r.data.resolution or 28

    def build(seed):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            den = make_denoiser(r, build_unet(r.model, resolution=res, in_channels=1, num_classes=NUM_CLASSES))
        g = torch.Generator().manual_seed(77)
        with torch.no_grad():
            for p in den.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        return den

    den, ref = build(0), build(0)
    K, B = 2, 3
    g = torch.Generator().manual_seed(5)
    x0 = (torch.rand(B, 1, res, res, generator=g) * 2 - 1).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (B, K), generator=g)
    labels[0, 1] = NULL_LABEL  # a dropped label, as CFG training does
    sigma, noise = draw_training_noise(x0, K=K, sigma_dist=LogNormalSigma(P_mean=r.diffusion.P_mean), generator=g)
    want = reference_grads(ref, x0, labels, sigma, noise)
    if (
        r.privacy.grad_sample_mode == "bk"
    ):  # book-keeping: per-example norms and the clipped sum, no per-sample gradients
        from privdiff.privacy.clipping import BookKeeping

        names = [n for n, _ in den.named_parameters()]
        norms_ref = torch.sqrt(sum(want[n].double().flatten(1).square().sum(1) for n in names)).float()
        C = 0.5 * float(norms_ref.min())  # every example clipped
        bk = BookKeeping(den, noise_multiplicity=K, max_grad_norm=C)
        with bk.recording():
            loss = denoising_loss(den, x0, labels, sigma=sigma, noise=noise, loss_weight=den.loss_weight)
        norms = bk.clipped_backward(loss)
        torch.testing.assert_close(norms, norms_ref, rtol=1e-4, atol=0)
        c = (C / (norms_ref + 1e-6)).clamp(max=1.0)
        got = {n: p.grad[None] for n, p in den.named_parameters()}
        clipped = {n: torch.tensordot(c, want[n], dims=1)[None] for n in names}
        assert_matches(got, clipped, den)
        return
    gsm = make_grad_sample_module(den, grad_sample_mode=r.privacy.grad_sample_mode)
    got = private_grads(gsm, den, x0, labels, sigma, noise, K)
    assert_matches(got, want, den)
