"""Mixed precision (``train.precision=bf16``) and the clipping path's host synchronisations.

Under bfloat16 autocast the forward and backward round every activation and output gradient to
bfloat16 (unit round-off u = 2⁻⁸ ≈ 3.9e-3); book-keeping upcasts what it records exactly and forms
the per-example norms, clip factors and clipped sum in float32/float64, and the noise is drawn in
float32. So against the float32 one-example-at-a-time reference the only error is the bf16
forward/backward's, and the tolerances below are stated in units of u:

* per-example norms ‖∇ℓ_b‖: relative error ≤ 2e-2 (≈ 5u; measured 5e-3 on CPU: the rounding of
  thousands of gradient entries partly averages out in a norm);
* the clipped sum Σ_b c_b ∇ℓ_b: relative error in Frobenius norm ≤ 4e-2 (≈ 10u; measured 1.2e-2:
  each entry carries the rounding of its own chain of bf16 products, and the entries near zero
  weigh more than in a norm).

Against the one-example reference run under the *same* autocast, bk must add nothing of its own
beyond bf16's: norms ≤ 4e-3 (≈ u) and clipped sums ≤ 1e-2 (measured 1.2e-4 and 1.4e-3: the
reference's weight gradients are themselves rounded to bf16, bk's are not).

Every test runs on CPU; the CUDA variants run where a GPU is present (benchmarks/device_check.sh).
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from privdiff.diffusion import Denoiser, LogNormalSigma, denoising_loss, draw_training_noise, drop_labels
from privdiff.models.unet import UNetConfig, UNetNet, build_unet
from privdiff.privacy import clipping
from privdiff.privacy.clipping import BookKeeping
from privdiff.privacy.dpsgd import DPSGD, NonPrivateSGD, forward_precision
from tests.helpers import assert_same, bookkeeping, jitter, reference

NORM_TOL, SUM_TOL = 2e-2, 4e-2  # bf16 against the float32 reference (see the module docstring)
SAME_NORM_TOL, SAME_SUM_TOL = 4e-3, 1e-2  # bf16 against the bf16 reference: bk's own error

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]

UNET = UNetConfig(channels=(16, 32), layers_per_block=1, attention_levels=(1,), norm_num_groups=8, attention_head_dim=8)


def _case(device: str, *, B: int, K: int, seed: int, channels_last: bool = False):
    """A jittered attention UNet on ``device`` and the DPDM loss on fresh random images, σ, noise and labels."""
    res, classes = 8, 10
    torch.manual_seed(seed)
    den = jitter(Denoiser(UNetNet(build_unet(UNET, resolution=res, in_channels=1, num_classes=classes))), seed + 1)
    den = den.to(device)
    g = torch.Generator().manual_seed(seed + 2)
    x0 = torch.rand(B, 1, res, res, generator=g) * 2 - 1
    sigma, noise = draw_training_noise(x0, K=K, sigma_dist=LogNormalSigma(), generator=g)
    y = drop_labels(
        torch.randint(0, classes, (B,), generator=g)[:, None].expand(-1, K), p=0.3, null_label=classes, generator=g
    )
    x0, sigma, noise, y = (t.to(device) for t in (x0, sigma, noise, y))
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)

    def batch_loss(m, precision="fp32"):
        with forward_precision(precision, m):
            return denoising_loss(m, x0, y, sigma=sigma, noise=noise, loss_weight=den.loss_weight)

    def row_loss(m, b, precision="fp32"):
        with forward_precision(precision, m):
            return denoising_loss(
                m,
                x0[b : b + 1],
                y[b : b + 1],
                sigma=sigma[b : b + 1],
                noise=noise[b : b + 1],
                loss_weight=den.loss_weight,
            )

    return den, batch_loss, row_loss


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.double().flatten() for t in tensors])


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "K,C,channels_last", [(1, 1e-2, False), (3, 1e-2, True), (2, 1e6, False)], ids=["K1", "K3-cl", "K2-noclip"]
)
def test_bf16_norms_and_clipped_sums_match_the_fp32_one_example_reference(device, K, C, channels_last):
    B = 4
    den, batch_loss, row_loss = _case(device, B=B, K=K, seed=10 + K, channels_last=channels_last)
    with clipping._full_precision():  # the fp32 reference must be float32 (no TF32 on CUDA)
        ref_norms, ref_sum = reference(den, row_loss, B, C)  # float32, one example at a time
        bf_norms, bf_sum = reference(den, lambda m, b: row_loss(m, b, "bf16"), B, C)  # bf16, one at a time
        bk_norms, bk_sum = bookkeeping(den, lambda m: batch_loss(m, "bf16"), K, C)  # bf16, one backward
    assert all(g.dtype == torch.float32 for g in bk_sum)  # the clipped sum is float32, like the parameters
    assert bk_norms.dtype == torch.float32 and bool((bk_norms > 0).all())
    norm_err = float(((bk_norms.double() - ref_norms.double()).abs() / ref_norms.double()).max())
    assert norm_err <= NORM_TOL, norm_err
    assert _rel(_flat(bk_sum), _flat(ref_sum)) <= SUM_TOL
    if C < 1:
        assert float(ref_norms.min()) > C  # the clipping was active for every example
    # and bk adds nothing beyond bf16's own rounding
    same_err = float(((bk_norms.double() - bf_norms.double()).abs() / bf_norms.double()).max())
    assert same_err <= SAME_NORM_TOL, same_err
    assert _rel(_flat(bk_sum), _flat(bf_sum)) <= SAME_SUM_TOL


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_bk_matches_the_one_example_reference_on_each_device(device):
    """The float32 check of tests/privacy/test_clipping.py (relative error ≤ 1e-4), also on CUDA (TF32 off)."""
    B, K = 4, 2
    den, batch_loss, row_loss = _case(device, B=B, K=K, seed=7, channels_last=device == "cuda")
    with clipping._full_precision():  # the fp32 reference must be float32 (no TF32 on CUDA)
        assert_same(den, batch_loss, row_loss, B, K, 1e-2)


def _engine_pair(device: str, *, private: bool, sigma: float = 1.0, C: float = 1e-2):
    """Two engines, fp32 and bf16, on identical copies of one model, with the same seeds (SGD, lr 1)."""
    den, _, _ = _case(device, B=6, K=2, seed=3)
    g = torch.Generator().manual_seed(4)
    x0 = (torch.rand(12, 1, 8, 8, generator=g) * 2 - 1).to(device)
    y = torch.randint(0, 10, (12,), generator=g).to(device)
    engines = {}
    for precision in ("fp32", "bf16"):
        model = Denoiser(UNetNet(build_unet(UNET, resolution=8, in_channels=1, num_classes=10))).to(device)
        model.load_state_dict(den.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        common = dict(
            num_examples=12,
            batch_size=6,
            noise_multiplicity=2,
            generator=torch.Generator().manual_seed(1),
            precision=precision,
        )
        if private:
            eng = DPSGD(
                model,
                opt,
                noise_multiplier=sigma,
                max_grad_norm=C,
                noise_generator=torch.Generator(device=device).manual_seed(2),
                **common,
            )
        else:
            eng = NonPrivateSGD(model, opt, **common)
        engines[precision] = (model, eng)

    def loss_fn(module, idx):
        gd = torch.Generator(device=device).manual_seed(int(idx.sum()))  # the same draws in both engines
        idx = idx.to(device)
        s, n = draw_training_noise(x0[idx], K=2, sigma_dist=LogNormalSigma(), generator=gd)
        return denoising_loss(
            module, x0[idx], y[idx][:, None].expand(-1, 2), sigma=s, noise=n, loss_weight=den.loss_weight
        )

    return engines, loss_fn


def _update(model, eng, idx, loss_fn) -> torch.Tensor:
    before = _flat(p.detach().clone() for p in model.parameters())
    loss = eng.step(idx, loss_fn)
    assert isinstance(loss, float) and loss > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return before - _flat(p.detach() for p in model.parameters())  # = the gradient applied (SGD, lr 1)


@pytest.mark.parametrize("device", DEVICES)
def test_nonprivate_step_in_bf16_matches_fp32(device):
    engines, loss_fn = _engine_pair(device, private=False)
    idx = torch.arange(6)
    with clipping._full_precision():  # the fp32 reference must be float32 (no TF32 on CUDA)
        u32, u16 = (_update(*engines[p], idx, loss_fn) for p in ("fp32", "bf16"))
    assert _rel(u16, u32) <= SUM_TOL


@pytest.mark.parametrize("device", DEVICES)
def test_dp_step_in_bf16_adds_the_same_fp32_noise_at_C(device):
    """Same seeds: the two precisions draw the same float32 noise σC (noise generator, shapes, dtype), so
    their updates differ by the clipped sums' bf16 error alone, far below the noise; and that noise is σC."""
    sigma, C, B = 1.0, 1e-2, 6
    engines, loss_fn = _engine_pair(device, private=True, sigma=sigma, C=C)
    idx = torch.arange(B)
    with clipping._full_precision():  # the fp32 reference must be float32 (no TF32 on CUDA)
        u32, u16 = (_update(*engines[p], idx, loss_fn) for p in ("fp32", "bf16"))
    # Σ_b c_b ∇ℓ_b has norm ≤ B·C in either precision; divided by the expected batch B
    assert float((u16 - u32).norm()) <= SUM_TOL * C * 2
    z = u16 * B  # ≈ the noise (its clipped sum is at most B·C in norm among ~10⁵ coordinates)
    assert abs(float(z.std()) / (sigma * C) - 1) < 0.02
    assert engines["bf16"][1].noise_multiplier == sigma and engines["bf16"][1].max_grad_norm == C


def test_precision_is_validated():
    model = torch.nn.Linear(3, 2)
    common = dict(num_examples=4, batch_size=2, generator=torch.Generator())
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        NonPrivateSGD(model, torch.optim.SGD(model.parameters(), lr=1), precision="fp16", **common)
    for mode, match in (("bk", "precision must be one of"), ("hooks", "needs grad_sample_mode='bk'")):
        with pytest.raises(ValueError, match=match):
            DPSGD(
                model,
                torch.optim.SGD(model.parameters(), lr=1),
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                noise_generator=torch.Generator(),
                grad_sample_mode=mode,
                precision="fp16" if mode == "bk" else "bf16",
                **common,
            )
    with pytest.raises(ValueError, match="precision must be one of"):
        forward_precision("half", model)


def test_recipe_key_is_validated():
    from privdiff.config import RecipeError, resolve_recipe

    assert resolve_recipe(None, []).train.precision == "fp32"
    assert resolve_recipe(None, ["train.precision=bf16"]).train.precision == "bf16"
    with pytest.raises(RecipeError, match=r"train.precision must be one of fp32, bf16, got 'fp16'"):
        resolve_recipe(None, ["train.precision=fp16"])
    with pytest.raises(RecipeError, match="needs privacy.grad_sample_mode=bk"):
        resolve_recipe(None, ["train.precision=bf16", "privacy.grad_sample_mode=hooks"])
    resolve_recipe(None, ["train.precision=bf16", "privacy.grad_sample_mode=hooks", "privacy.enabled=false"])
    with pytest.raises(RecipeError, match=r"dpdm.pretrain.precision must be one of"):
        resolve_recipe(None, ["dpdm.pretrain.precision=float16"])


# -- host synchronisations in the clipping path ----------------------------------------------------


class _Mixed(torch.nn.Module):
    """Direct and ghost layers, a GroupNorm and an Embedding: every rule of the engine in one step."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(5, 16)
        self.t = torch.nn.Linear(16, 64)  # one position per row: a ghost layer (4·T·(d+p) < p·d)
        self.t2 = torch.nn.Linear(64, 64)  # ghost too
        self.conv = torch.nn.Conv2d(2, 8, 3, padding=1)  # many positions: direct
        self.gn = torch.nn.GroupNorm(2, 8)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x, tok):
        e = self.t2(torch.tanh(self.t(self.emb(tok))))  # [R, 64]
        h = torch.relu(self.gn(self.conv(x)))  # [R, 8, 6, 6]
        return self.head(h.mean((2, 3)) + e[:, :8]).squeeze(1)


_SYNCING = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "nonzero")


def _count_syncing_calls(monkeypatch) -> dict[str, int]:
    """Count calls of the tensor methods that wait for the device, made from privacy/clipping.py itself."""
    counts = dict.fromkeys(_SYNCING, 0)
    for name in _SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            if sys._getframe(1).f_code.co_filename.endswith("clipping.py"):
                counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    original_nonzero = torch.nonzero

    def nonzero(*args, **kwargs):
        if sys._getframe(1).f_code.co_filename.endswith("clipping.py"):
            counts["nonzero"] += 1
        return original_nonzero(*args, **kwargs)

    monkeypatch.setattr(torch, "nonzero", nonzero)
    return counts


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_clipping_waits_for_the_device_once_per_step(monkeypatch, precision):
    """After the first step (its one-time example-axis probe and kernel timing), a clipped backward
    reads ONE tensor back to the host: the flags of non-finite norms and of cancelling ghost Grams,
    after all of its work is queued. Everything else stays on the device."""
    B, K = 6, 2
    torch.manual_seed(0)
    model = jitter(_Mixed(), 1)
    g = torch.Generator().manual_seed(2)
    x, tok = torch.randn(B * K, 2, 6, 6, generator=g), torch.randint(0, 5, (B * K,), generator=g)
    bk = BookKeeping(model, noise_multiplicity=K, max_grad_norm=1e-2)
    ghosts = []
    ghost_sq = clipping._ghost_sq
    monkeypatch.setattr(clipping, "_ghost_sq", lambda layer, *a: ghosts.append(layer.name) or ghost_sq(layer, *a))

    def step():
        with bk.recording(), forward_precision(precision, model):
            loss = (model(x, tok) ** 2).view(B, K).mean(1)
        norms = bk.clipped_backward(loss)
        return norms, [p.grad.clone() for p in model.parameters()]

    first = step()  # the one-time probes
    assert ghosts == ["t2", "t"]  # two ghost layers, each of which used to wait for the host
    counts = _count_syncing_calls(monkeypatch)
    second = step()
    monkeypatch.undo()
    assert counts == {**dict.fromkeys(_SYNCING, 0), "cpu": 1, "__bool__": 2}, counts  # the two bools read the host copy
    assert torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    bk.remove()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_clipping_waits_for_the_device_once_per_step_on_cuda():
    """The same, by CUDA's own account: at most one synchronising call in a (second) clipped backward."""
    B, K = 6, 2
    torch.manual_seed(0)
    model = jitter(_Mixed(), 1).cuda()
    x, tok = torch.randn(B * K, 2, 6, 6, device="cuda"), torch.randint(0, 5, (B * K,), device="cuda")
    bk = BookKeeping(model, noise_multiplicity=K, max_grad_norm=1e-2)

    def step():
        with bk.recording():
            loss = (model(x, tok) ** 2).view(B, K).mean(1)
        return bk.clipped_backward(loss)

    step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in seen if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]
    bk.remove()
