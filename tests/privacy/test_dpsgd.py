"""DP-SGD engine: clipping, noise multiplicity, the Gaussian noise, virtual batches, Poisson sampling.

Every number is checked against an obvious reference: per-example gradients from a plain model
one example at a time (or in closed form for a linear model), clipping done by hand, noise
statistics against N(0, (σC)²), batch sizes against Binomial(N, q).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from privdiff.diffusion import Denoiser, LogNormalSigma, denoising_loss, draw_training_noise
from privdiff.models.unet import UNetConfig, UNetNet, build_unet
from privdiff.privacy.dpsgd import DPSGD, PoissonBatches, fold_noise_multiplicity

CFG = UNetConfig(channels=(16, 32), layers_per_block=1, attention_levels=(1,), norm_num_groups=8, attention_head_dim=8)
RES = 8
NUM_CLASSES = 10


# -- fixtures ----------------------------------------------------------------------------------


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it was asked to apply (the privatised gradient)."""

    def step(self, closure=None):
        self.seen = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def build_denoiser(seed: int = 0) -> Denoiser:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Denoiser(UNetNet(build_unet(CFG, resolution=RES, in_channels=1, num_classes=NUM_CLASSES)))


class MnistLike:
    """N random 1×8×8 images in [-1, 1] with labels, and a fixed (σ, n) per example and draw."""

    def __init__(self, n: int = 12, K: int = 1, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        # blurred blobs clamped to [-1, 1]: not zeros, not pure noise
        raw = torch.randn(n, 1, RES + 2, RES + 2, generator=g)
        self.x = (raw.unfold(2, 3, 1).unfold(3, 3, 1).mean((-1, -2)) * 3).clamp(-1, 1)
        self.labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        self.sigma, self.noise = draw_training_noise(self.x, K=K, sigma_dist=LogNormalSigma(), generator=g)
        self.K = K

    def loss_fn(self, module, idx):
        """``loss_fn(module, indices)`` as DPSGD calls it: per-example loss [len(idx)]."""
        return denoising_loss(
            module,
            self.x[idx],
            self.labels[idx],
            sigma=self.sigma[idx],
            noise=self.noise[idx],
            loss_weight=getattr(module, "_module", module).loss_weight,  # GradSampleModule hides it
        )

    def row_loss(self, model, i: int, k: int) -> torch.Tensor:
        """Example i's draw-k loss alone (ℓ_ik, not divided by K)."""
        return denoising_loss(
            model,
            self.x[i : i + 1],
            self.labels[i : i + 1],
            sigma=self.sigma[i : i + 1, k : k + 1],
            noise=self.noise[i : i + 1, k : k + 1],
        )


def engine_for(model, *, n, batch_size, sigma, C, K=1, max_physical=512, noise_seed=0, lr=1.0, mode="hooks"):
    opt = RecordingSGD(model.parameters(), lr=lr)
    return DPSGD(
        model,
        opt,
        num_examples=n,
        batch_size=batch_size,
        noise_multiplier=sigma,
        max_grad_norm=C,
        noise_multiplicity=K,
        max_physical_batch_size=max_physical,
        generator=torch.Generator().manual_seed(1),
        noise_generator=torch.Generator().manual_seed(noise_seed),
        grad_sample_mode=mode,
    )


def clipped_sum(engine: DPSGD, loss_fn, idx) -> torch.Tensor:
    """Σ_b clipped g_b over ``idx``, through the engine's own backward + fold + clip (flat)."""
    opt = engine.optimizer
    opt.zero_grad(set_to_none=True)
    if engine.bk is not None:  # book-keeping: the clipped sum is what the backward leaves in p.grad
        with engine.bk.recording():
            loss = loss_fn(engine.module, torch.as_tensor(idx))
        engine.bk.clipped_backward(loss)
        out = flat(p.grad for p in opt.params).clone()
        opt.zero_grad(set_to_none=True)
        return out
    loss_fn(engine.module, torch.as_tensor(idx)).sum().backward()
    fold_noise_multiplicity(engine.module, engine.K)
    assert all(p.grad_sample.shape[0] == len(idx) for p in opt.params)
    opt.clip_and_accumulate()
    out = flat(p.summed_grad for p in opt.params).clone()
    opt.zero_grad(set_to_none=True)
    return out


def plain_example_grad(model, loss) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss.sum().backward()
    return flat(torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()).clone()


def assert_close_rel(got, want, rtol=1e-5, what=""):
    err = float((got - want).abs().max())
    scale = float(want.abs().max())
    assert err <= rtol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


# -- clipping ----------------------------------------------------------------------------------


MODES = ["hooks", "bk"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("C", [1e-2, 1e6], ids=["clipping", "no-clipping"])
def test_clipping_on_real_batches(C, mode):
    data = MnistLike(n=8, K=1, seed=1)
    den, ref = build_denoiser(0), build_denoiser(0)
    engine = engine_for(den, n=8, batch_size=4, sigma=0.0, C=C, mode=mode)
    idx = [0, 2, 3, 5, 6, 7]

    unclipped = [plain_example_grad(ref, data.loss_fn(ref, torch.tensor([i]))) for i in idx]
    singles = [clipped_sum(engine, data.loss_fn, [i]) for i in idx]
    batch = clipped_sum(engine, data.loss_fn, idx)

    for g, s in zip(unclipped, singles):
        assert float(s.norm()) <= C * (1 + 1e-5)
        if C < 1:  # clipping active: every example is rescaled onto the sphere of radius C
            assert float(g.norm()) > 10 * C
            assert float(s.norm()) == pytest.approx(C, rel=1e-4)
            assert_close_rel(s, g * (C / g.norm()), rtol=1e-4, what="clipped direction")
        else:  # inactive: the clipped gradient is the per-example gradient itself
            assert_close_rel(s, g, rtol=1e-4, what="unclipped")
    assert_close_rel(batch, torch.stack(singles).sum(0), rtol=1e-5, what="batch vs Σ single")
    if C > 1:
        whole = plain_example_grad(ref, data.loss_fn(ref, torch.tensor(idx)))
        assert_close_rel(batch, whole, rtol=1e-4, what="batch vs plain gradient of the summed loss")


@pytest.mark.parametrize("mode", MODES)
def test_step_update_is_clipped_sum_over_expected_batch_size(mode):
    """σ = 0: the applied gradient is Σ clipped / (qN), not divided by the realised batch size."""
    C = 1e-2
    data = MnistLike(n=10, K=1, seed=2)
    den = build_denoiser(0)
    engine = engine_for(den, n=10, batch_size=4, sigma=0.0, C=C, mode=mode)
    idx = torch.tensor([1, 2, 4, 5, 8, 9])  # 6 examples drawn, 4 expected
    reference = sum(clipped_sum(engine, data.loss_fn, [int(i)]) for i in idx) / 4
    ref = build_denoiser(0)
    expected_loss = float(data.loss_fn(ref, idx).mean())
    before = flat(p.detach() for p in den.parameters()).clone()
    loss = engine.step(idx, data.loss_fn)
    applied = flat(engine.optimizer.original_optimizer.seen)
    assert_close_rel(applied, reference, rtol=1e-5, what="applied gradient")
    torch.testing.assert_close(flat(p.detach() for p in den.parameters()), before - applied)  # SGD, lr = 1
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert engine.noised_steps == 1
    assert all(getattr(p, "grad_sample", None) is None and p.grad is None for p in den.parameters())


# -- noise multiplicity -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hooks", "functorch", "bk"])
def test_noise_multiplicity_one_clipped_gradient_per_example(mode):
    K, C = 3, 1e-2
    data = MnistLike(n=6, K=K, seed=3)
    den, ref = build_denoiser(0), build_denoiser(0)
    engine = engine_for(den, n=6, batch_size=3, sigma=0.0, C=C, K=K, mode=mode)
    idx = [0, 1, 3, 4]

    # B·K rows before the fold, B rows after (Opacus' modes)
    if mode == "bk":
        _check_one_clipped_gradient_per_example(engine, data, ref, idx, K, C)
        return
    data.loss_fn(engine.module, torch.tensor(idx)).sum().backward()
    assert all(p.grad_sample.shape[0] == len(idx) * K for p in engine.optimizer.params)
    rows = {id(p): p.grad_sample.clone() for p in engine.optimizer.params}
    fold_noise_multiplicity(engine.module, K)
    for p in engine.optimizer.params:
        assert p.grad_sample.shape == (len(idx), *p.shape)
        torch.testing.assert_close(p.grad_sample, rows[id(p)].view(len(idx), K, *p.shape).sum(1))
    engine.optimizer.zero_grad(set_to_none=True)

    _check_one_clipped_gradient_per_example(engine, data, ref, idx, K, C)


def _check_one_clipped_gradient_per_example(engine, data, ref, idx, K, C):
    batch = clipped_sum(engine, data.loss_fn, idx)
    singles = []
    for i in idx:
        got = clipped_sum(engine, data.loss_fn, [i])
        singles.append(got)
        # reference: the K-averaged per-example gradient, clipped once
        g = plain_example_grad(ref, data.loss_fn(ref, torch.tensor([i])))
        rows_i = [plain_example_grad(ref, data.row_loss(ref, i, k) / K) for k in range(K)]
        assert_close_rel(g, torch.stack(rows_i).sum(0), rtol=1e-4, what="Σ_k rows = example gradient")
        assert float(got.norm()) <= C * (1 + 1e-5)
        assert_close_rel(got, g * min(1.0, C / float(g.norm())), rtol=1e-4, what="clip the K-average")
        # clipping each draw separately is a different (and K times more sensitive) mechanism
        per_row = sum(r * min(1.0, C / float(r.norm())) for r in rows_i)
        assert float((per_row - got).norm()) > 0.05 * C
        assert float(per_row.norm()) > 1.5 * C
    assert_close_rel(batch, torch.stack(singles).sum(0), rtol=1e-5, what="batch vs Σ single")


# -- the Gaussian noise -------------------------------------------------------------------------


class LinearTask:
    """ℓ_b = ⟨W x_b + c, u⟩: per-example gradient (u x_bᵀ, u) in closed form."""

    def __init__(self, n=20, d_in=64, d_out=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d_in, generator=g)
        self.u = torch.randn(d_out, generator=g)

    def loss_fn(self, module, idx):
        return module(self.x[idx]) @ self.u

    def clipped_sum(self, idx, C):
        total_w, total_b = 0, 0
        for i in idx:
            gw, gb = torch.outer(self.u, self.x[i]), self.u
            norm = math.sqrt(float(gw.square().sum() + gb.square().sum()))
            f = min(1.0, C / norm)
            total_w, total_b = total_w + f * gw, total_b + f * gb
        return flat([total_w, total_b])


def noise_of_step(sigma, C, batch_size, idx, noise_seed=0, n=20):
    task = LinearTask(n=n)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Linear(64, 64)
    engine = engine_for(model, n=n, batch_size=batch_size, sigma=sigma, C=C, noise_seed=noise_seed)
    engine.step(torch.as_tensor(idx, dtype=torch.long), task.loss_fn)
    assert engine.noised_steps == 1
    applied = flat(engine.optimizer.original_optimizer.seen)
    return applied - task.clipped_sum(idx, C) / batch_size


def assert_gaussian(z: torch.Tensor, std: float):
    z = z.double().numpy()
    se = std / math.sqrt(len(z))
    assert abs(z.mean()) < 5 * se
    assert z.std() == pytest.approx(std, rel=0.05)  # 4160 samples: the sample std is within ~1.1%
    assert stats.kstest(z / std, "norm").pvalue > 1e-3


@pytest.mark.parametrize("sigma,C", [(1.3, 0.5), (0.6, 3.0)])
def test_noise_std_is_sigma_C_over_expected_batch_size(sigma, C):
    idx = [0, 3, 4, 9, 11, 15, 17]
    batch_size = 5
    noise = noise_of_step(sigma, C, batch_size, idx)
    assert noise.numel() == 64 * 64 + 64
    assert_gaussian(noise, sigma * C / batch_size)
    # the clipping was active for this C (so the subtracted part is the clipped, not the raw, sum)
    assert float(LinearTask().clipped_sum([0], 1e9).norm()) > C
    # the noise generator drives the noise: same seed, same noise; another seed, another noise
    torch.testing.assert_close(noise_of_step(sigma, C, batch_size, idx), noise, rtol=0, atol=1e-6)
    other = noise_of_step(sigma, C, batch_size, idx, noise_seed=1)
    assert float((other - noise).abs().max()) > sigma * C / batch_size


def test_no_noise_when_sigma_zero():
    noise = noise_of_step(0.0, 0.5, 5, [1, 2, 3])
    assert float(noise.abs().max()) < 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_empty_poisson_batch_adds_noise_and_counts(mode):
    sigma, C, batch_size = 1.1, 0.7, 4

    def must_not_run(module, idx):
        raise AssertionError("loss_fn called on an empty batch")

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Linear(64, 64)
    before = flat(p.detach() for p in model.parameters()).clone()
    engine = engine_for(model, n=20, batch_size=batch_size, sigma=sigma, C=C, mode=mode)
    loss = engine.step(torch.empty(0, dtype=torch.long), must_not_run)
    assert loss == 0.0
    assert engine.noised_steps == 1
    applied = flat(engine.optimizer.original_optimizer.seen)
    assert_gaussian(applied, sigma * C / batch_size)
    torch.testing.assert_close(flat(p.detach() for p in model.parameters()), before - applied)
    # and a second empty step is a second noised step
    engine.step(torch.empty(0, dtype=torch.long), must_not_run)
    assert engine.noised_steps == 2


# -- virtual batches ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_virtual_batches_match_one_chunk(sigma, mode):
    K, C = 2, 1e-2
    data = MnistLike(n=10, K=K, seed=4)
    idx = torch.tensor([0, 2, 3, 6, 7])
    grads = []
    for max_physical in (512, 2, 5):  # one chunk; one example per chunk; 2 examples per chunk
        den = build_denoiser(0)
        before = flat(p.detach() for p in den.parameters()).clone()
        engine = engine_for(
            den, n=10, batch_size=4, sigma=sigma, C=C, K=K, max_physical=max_physical, noise_seed=7, mode=mode
        )
        assert engine.examples_per_chunk == max(1, max_physical // K)
        engine.step(idx, data.loss_fn)
        assert engine.noised_steps == 1  # one logical step, however many chunks
        grads.append(flat(engine.optimizer.original_optimizer.seen))
        torch.testing.assert_close(flat(p.detach() for p in den.parameters()), before - grads[-1])
    for g in grads[1:]:
        assert_close_rel(g, grads[0], rtol=1e-5, what="chunked vs one chunk")
    if sigma == 0.0:  # and the chunked result is the clipped sum over the expected batch size
        den = build_denoiser(0)
        engine = engine_for(den, n=10, batch_size=4, sigma=0.0, C=C, K=K, mode=mode)
        reference = sum(clipped_sum(engine, data.loss_fn, [int(i)]) for i in idx) / 4
        assert_close_rel(grads[1], reference, rtol=1e-5, what="chunked vs reference")
    else:
        assert float(grads[0].std()) == pytest.approx(sigma * C / 4, rel=0.05)


@pytest.mark.parametrize("K", [1, 4])
def test_bookkeeping_and_opacus_give_the_same_noised_update(K):
    """Same model, batch and seeds: privdiff's one-backward path and Opacus' per-sample path apply the same update."""
    data = MnistLike(n=10, K=K, seed=5)
    idx = torch.tensor([0, 1, 4, 6, 9])
    applied = {}
    for mode in ("hooks", "functorch", "bk"):
        den = build_denoiser(0)
        engine = engine_for(den, n=10, batch_size=4, sigma=1.3, C=3e-2, K=K, noise_seed=11, mode=mode)
        engine.step(idx, data.loss_fn)
        applied[mode] = flat(engine.optimizer.original_optimizer.seen)
    noise_scale = 1.3 * 3e-2 / 4
    for mode in ("functorch", "bk"):
        assert float((applied[mode] - applied["hooks"]).abs().max()) <= 1e-4 * noise_scale, mode


@pytest.mark.parametrize("mode", MODES)
def test_nothing_from_a_failed_or_altered_step_reaches_the_update(mode):
    """Leftovers of a step that raised mid-way are discarded; freezing a parameter after building the engine is refused."""
    data = MnistLike(n=10, K=2, seed=6)
    den = build_denoiser(0)
    engine = engine_for(den, n=10, batch_size=4, sigma=0.0, C=1e-2, K=2, max_physical=2, mode=mode)
    calls = {"n": 0}

    def fails_on_second_chunk(module, idx):
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("simulated")
        return data.loss_fn(module, idx)

    with pytest.raises(MemoryError):
        engine.step(torch.tensor([0, 1, 2]), fails_on_second_chunk)
    engine.step(torch.tensor([5, 6]), data.loss_fn)  # a retry of another batch
    fresh = build_denoiser(0)
    ref_engine = engine_for(fresh, n=10, batch_size=4, sigma=0.0, C=1e-2, K=2, max_physical=2, mode=mode)
    ref_engine.step(torch.tensor([5, 6]), data.loss_fn)
    assert_close_rel(
        flat(engine.optimizer.original_optimizer.seen),
        flat(ref_engine.optimizer.original_optimizer.seen),
        rtol=1e-5,
        what="update after a failed step",
    )
    if mode == "bk":
        next(den.parameters()).requires_grad_(False)
        with pytest.raises(RuntimeError, match="not the ones the engine clips"):
            engine.step(torch.tensor([1]), data.loss_fn)


def test_row_mixing_layers_are_refused_in_every_mode():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 1))
    for mode in ("hooks", "functorch", "bk"):
        with pytest.raises(ValueError, match="mixes examples"):
            engine_for(model, n=10, batch_size=4, sigma=1.0, C=1.0, mode=mode)


# -- Poisson sampling ---------------------------------------------------------------------------


def binomial_gof_pvalue(sizes, n: int, q: float) -> float:
    """Chi-square goodness of fit of batch sizes to Binomial(n, q) (tail bins merged, expected ≥ 5)."""
    sizes = np.asarray(sizes)
    m = len(sizes)
    probs = stats.binom.pmf(np.arange(n + 1), n, q)
    edges, acc = [], 0.0
    lo = 0
    for k in range(n + 1):  # bins [lo, k] with at least 5 expected counts
        acc += probs[k]
        if acc * m >= 5:
            edges.append((lo, k))
            lo, acc = k + 1, 0.0
    if lo <= n:  # remainder merges into the last bin
        edges[-1] = (edges[-1][0], n)
    observed = np.array([((sizes >= a) & (sizes <= b)).sum() for a, b in edges])
    expected = np.array([probs[a : b + 1].sum() for a, b in edges]) * m
    expected *= m / expected.sum()
    return float(stats.chisquare(observed, expected).pvalue)


def binomial_variance_pvalue(sizes, n: int, q: float) -> float:
    """Two-sided test of the sample variance against n·q·(1-q): (m-1)s²/σ² ~ χ²(m-1)."""
    sizes = np.asarray(sizes, dtype=float)
    m = len(sizes)
    stat = (m - 1) * sizes.var(ddof=1) / (n * q * (1 - q))
    cdf = stats.chi2.cdf(stat, m - 1)
    return float(2 * min(cdf, 1 - cdf))


def test_poisson_batch_sizes_are_binomial():
    n, q, m = 100, 0.1, 2000
    batches = PoissonBatches(num_examples=n, sample_rate=q, generator=torch.Generator().manual_seed(123))
    assert batches.sample_rate == q
    draws = [batches.next() for _ in range(m)]
    sizes = [len(b) for b in draws]
    for b in draws:
        assert b.dtype == torch.long
        assert torch.equal(b, torch.unique(b))  # sorted, no repeats
        assert len(b) == 0 or (0 <= int(b.min()) and int(b.max()) < n)
    assert 0 in sizes or min(sizes) <= 3  # sizes genuinely vary, down to (nearly) empty batches
    assert binomial_gof_pvalue(sizes, n, q) > 1e-3
    assert binomial_variance_pvalue(sizes, n, q) > 1e-3
    # the same tests reject fixed-size batches (what a shuffling loader gives), so they can fail
    fixed = [int(n * q)] * m
    assert binomial_gof_pvalue(fixed, n, q) < 1e-6
    assert binomial_variance_pvalue(fixed, n, q) < 1e-6
    # ... and accept true binomial draws
    assert binomial_gof_pvalue(np.random.default_rng(0).binomial(n, q, m), n, q) > 1e-3

    # each index is included independently with probability q
    counts = torch.zeros(n)
    for b in draws:
        counts[b] += 1
    z = (counts - m * q) / math.sqrt(m * q * (1 - q))
    assert float(z.abs().max()) < 4.5
    assert stats.chi2.sf(float(z.square().sum()), n) > 1e-3


def test_poisson_batches_reproducible_and_validated():
    a = PoissonBatches(num_examples=50, sample_rate=0.2, generator=torch.Generator().manual_seed(5))
    b = PoissonBatches(num_examples=50, sample_rate=0.2, generator=torch.Generator().manual_seed(5))
    c = PoissonBatches(num_examples=50, sample_rate=0.2, generator=torch.Generator().manual_seed(6))
    sa, sb, sc = ([p.next() for _ in range(5)] for p in (a, b, c))
    assert all(torch.equal(x, y) for x, y in zip(sa, sb))
    assert not all(torch.equal(x, y) for x, y in zip(sa, sc))
    assert len({tuple(x.tolist()) for x in sa}) > 1  # a new batch every call
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="sample rate"):
            PoissonBatches(num_examples=50, sample_rate=bad, generator=torch.Generator())


def test_engine_sample_rate():
    engine = engine_for(nn.Linear(3, 2), n=250, batch_size=10, sigma=1.0, C=1.0)
    assert engine.sample_rate == pytest.approx(10 / 250)
    assert engine.noise_multiplier == 1.0 and engine.max_grad_norm == 1.0
