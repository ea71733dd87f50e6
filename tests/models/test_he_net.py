"""The HE-friendly denoiser is trained privately (recipe he-ldm-mnist5k): its per-example gradients
must match one example at a time, and DP-LDM's trainable groups must name its parts."""

from __future__ import annotations

import pytest
import torch

from privdiff.models.latent import select_trainable
from tests.helpers import assert_latent_net_same, tiny_he_net


@pytest.mark.parametrize("K", [1, 3])
def test_per_example_gradients_of_the_recipes_trainable_part_match_one_example_at_a_time(K):
    net = tiny_he_net(3)
    n, total = select_trainable(net, ("unet", "class_embedder"))  # the recipe's ldm.trainable
    assert 0 < n < total and not any(p.requires_grad for p in net.text_encoder.parameters())
    assert_latent_net_same(net, K)


def test_trainable_groups_and_save_load(tmp_path):
    from privdiff.models.saved import load_net

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


def test_the_core_config_and_training_import_nothing_of_encrypted_inference():
    """Layering: config, models, methods, runs and the CLI module load without privdiff.he, TenSEAL or aiohttp
    (a fresh interpreter: this test process may have imported them already)."""
    import subprocess
    import sys

    code = (
        "import sys, privdiff.config, privdiff.cli, privdiff.runs, privdiff.models.he_net, privdiff.models.unet\n"
        "import privdiff.methods.dpdm, privdiff.methods.dp_ldm, privdiff.methods.dpp, privdiff.methods.lora, privdiff.evaluation.audit\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('tenseal', 'aiohttp') or m.startswith('privdiff.he'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
