"""Private mode: packing, permutations, one encrypted denoiser evaluation and a whole sampling run
against plaintext from the same seed. CKKS: the "precise" preset (N = 8192, Δ = 2^40) that the
service uses; the model is tiny (H = 32, one block) so the tests take seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("tenseal")

from privdiff.diffusion import Denoiser, guided_denoiser, sample  # noqa: E402
from privdiff.he.ckks import TenSEALContext  # noqa: E402
from privdiff.he.private import (
    PrivateServer,
    client_net,
    layout,
    pack_inputs,
    pack_weights,
    permute_layers,
    unpack_outputs,
)  # noqa: E402
from tests.helpers import tiny_he_net  # noqa: E402

PROMPT = "a handwritten digit three"


@pytest.mark.parametrize(
    "P,n_in,n_out,slots", [(2, 7, 5, 64), (3, 40, 9, 64), (50, 6, 4, 64), (1, 200, 128, 4096), (20, 16, 64, 256)]
)
def test_packing_computes_the_layer(P, n_in, n_out, slots):
    """Client packing ⊙ server packing, summed per vector and unpacked = X Wᵀ + b (plaintext slot arithmetic)."""
    rng = np.random.default_rng(P * n_in)
    X, W, b = rng.standard_normal((P, n_in)), rng.standard_normal((n_out, n_in)), rng.standard_normal(n_out)
    xs, blocks = pack_inputs(X, n_out, slots), pack_weights(W, b, P, slots)
    assert all(len(v) <= slots for v in xs)
    outs, i = [], 0
    for weights, bias in blocks:
        acc = sum(xs[i + k] * w for k, w in enumerate(weights)) + bias
        i += len(weights)
        outs.append(acc)
    assert i == len(xs) == sum(blk.K for blk in layout(P, n_in, n_out, slots))
    np.testing.assert_allclose(unpack_outputs(outs, P, n_in, n_out, slots), X @ W.T + b, rtol=1e-10, atol=1e-10)


def test_permuted_weights_compute_the_same_function_in_another_order():
    net = tiny_he_net(1)
    core = net.unet
    plain, perm = permute_layers(core, None), permute_layers(core, np.random.default_rng(5))
    assert not np.array_equal(plain["in"][0], perm["in"][0])  # the client sees hidden units in another order
    assert sorted(plain["in"][0][:, 0].tolist()) == sorted(perm["in"][0][:, 0].tolist())
    x, c = torch.randn(3, *core.latent_shape), torch.randn(3)
    ctx = torch.randn(3, 5, core.context_width)

    def with_weights(weights):
        def linear(names, a):
            W = np.concatenate([weights[n][0] for n in names])
            b = np.concatenate(
                [weights[n][1] if weights[n][1] is not None else np.zeros(weights[n][0].shape[0]) for n in names]
            )
            return torch.from_numpy(a.double().numpy() @ W.T + b).float()

        return linear

    from privdiff.models.he_net import core_forward, keys_values

    ref = core(x, c, ctx)
    for weights in (plain, perm):
        out = core_forward(
            core.config,
            core.latent_shape,
            x,
            c,
            keys_values(core.config, ctx, with_weights(weights)),
            with_weights(weights),
        )
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def private():
    net = tiny_he_net(2)
    server = PrivateServer(net.unet)
    ctx = TenSEALContext.generate()
    sid = server.open_session(ctx.public_bytes())
    remote = client_net(server.spec(), net, ctx, lambda names, P, cts: server.linear(sid, names, P, cts))
    return net, remote


def test_one_encrypted_denoising_step_matches_plaintext(private):
    net, remote = private
    den, den_he = Denoiser(net, sigma_data=1.0), Denoiser(remote, sigma_data=1.0)
    cond = torch.cat([net.conditions(prompts=[PROMPT], n=1), net.null_condition()[None]])
    g = torch.Generator().manual_seed(3)
    for sigma in (20.0, 0.5):
        x = sigma * torch.randn(2, *net.sample_shape, generator=g)
        with torch.no_grad():
            ref, out = den(x, torch.full((2,), sigma), cond), den_he(x, torch.full((2,), sigma), cond)
        # the network output F itself, not only D (at large σ, D ≈ c_skip·x hides F)
        assert ((out - ref).norm() / ref.norm()).item() <= 1e-3
        with torch.no_grad():
            c_noise = torch.full((2,), 0.25 * np.log(sigma))
            F_ref, F_he = net(x, c_noise, cond), remote(x, c_noise, cond)
        assert ((F_he - F_ref).norm() / F_ref.norm()).item() <= 1e-3


def test_private_sampling_run_matches_plaintext(private):
    """Same seed, same sampler: every step's D within 1e-3 relative, the decoded image ≥ 40 dB PSNR."""
    from privdiff.models.autoencoder import AutoencoderConfig, build_autoencoder

    net, remote = private
    torch.manual_seed(4)
    ae = build_autoencoder(
        AutoencoderConfig(channels=(8, 16, 16), norm_num_groups=4), in_channels=1, resolution=16
    ).eval()
    decode = lambda z: ae.decode(z).sample  # noqa: E731

    def run(n):
        cond = torch.cat([n.conditions(prompts=[PROMPT], n=1)])
        fn = guided_denoiser(Denoiser(n, sigma_data=1.0), cond, guidance=2.0, null_label=n.null_condition())
        steps = []
        with torch.no_grad():
            z = sample(
                fn,
                shape=(1, *net.sample_shape),
                sampler="heun",
                steps=4,
                generator=torch.Generator().manual_seed(7),
                callback=lambda d: steps.append(d["denoised"].clone()),
            )
            img = (decode(z).clamp(-1, 1) + 1) / 2
        return steps, img

    steps_ref, img_ref = run(net)
    steps_he, img_he = run(remote)
    assert len(steps_ref) == len(steps_he) == 4
    for a, b in zip(steps_ref, steps_he):
        assert ((b - a).norm() / a.norm()).item() <= 1e-3
    mse = (img_he - img_ref).square().mean().item()
    psnr = 10 * np.log10(1.0 / max(mse, 1e-20))
    assert psnr >= 40.0, psnr
