"""The HE-friendly denoiser is trained privately (recipe he-ldm-mnist5k): its per-example gradients
must match one example at a time, and DP-LDM's trainable groups must name its parts."""

from __future__ import annotations

import pytest
import torch

from privdiff.data.captions import caption
from privdiff.diffusion import Denoiser, LogNormalSigma, denoising_loss, draw_training_noise
from privdiff.models.latent import select_trainable
from tests.he.test_private import NAMES, tiny_he_net
from tests.privacy.test_bookkeeping import assert_same


@pytest.mark.parametrize("K", [1, 3])
def test_per_example_gradients_of_the_recipes_trainable_part_match_one_example_at_a_time(K):
    net = tiny_he_net(3)
    n, total = select_trainable(net, ("unet", "class_embedder"))  # the recipe's ldm.trainable
    assert 0 < n < total and not any(p.requires_grad for p in net.text_encoder.parameters())
    den = Denoiser(net, sigma_data=1.0)
    B, g = 4, torch.Generator().manual_seed(4)
    x0 = torch.randn(B, *net.sample_shape, generator=g)
    sigma, noise = draw_training_noise(x0, K=K, sigma_dist=LogNormalSigma(), generator=g)
    cond = net.conditions(labels=torch.randint(0, 10, (B * K,), generator=g), prompts=[caption(NAMES[i % 10]) for i in range(B * K)], n=B * K)
    cond = cond.view(B, K, -1)

    def batch_loss(m):
        return denoising_loss(m, x0, cond, sigma=sigma, noise=noise, loss_weight=den.loss_weight)

    def row_loss(m, b):
        return denoising_loss(m, x0[b:b + 1], cond[b:b + 1], sigma=sigma[b:b + 1], noise=noise[b:b + 1], loss_weight=den.loss_weight)

    assert_same(den, batch_loss, row_loss, B, K, 1e-2)


def test_trainable_groups_and_save_load(tmp_path):
    from privdiff.models import load_net

    net = tiny_he_net(5)
    n_attn, _ = select_trainable(net, ("attentions",))
    assert n_attn == sum(p.numel() for p in net.unet.attentions.parameters())
    net.save_pretrained(tmp_path / "net")
    back = load_net(tmp_path / "net")
    assert type(back).__name__ == "HENet"
    x, c = torch.randn(2, *net.sample_shape), torch.randn(2)
    cond = net.conditions(prompts=["a handwritten digit three"], n=2)
    with torch.no_grad():
        assert torch.equal(back(x, c, cond), net(x, c, cond))
