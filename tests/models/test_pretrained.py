"""A user's own diffusers UNet: loaded from a local directory with its own objective, and trained privately
with per-example gradients proven on its real block types (ResnetBlock2D, CrossAttnDown/UpBlock2D,
Transformer2DModel with GEGLU, LayerNorm, GroupNorm, attention processors, time and class embeddings,
and peft LoRA layers) against one example at a time."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from torch import nn

from privdiff.diffusion import denoising_loss
from privdiff.diffusion.discrete import DiscreteSchedule, DiscreteSigma, VPDenoiser
from privdiff.models.pretrained import (
    DiffusersUNetNet,
    add_lora,
    export_lora,
    export_pipeline,
    load_pretrained_unet,
    select_trainable,
)
from privdiff.privacy.clipping import BookKeeping
from tests.helpers import assert_same, jitter, tiny_pixel_unet, tiny_sd_unet


ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
# recipes/sd-lora*.yaml's lora.targets: every projection of the Transformer2DModel blocks (PrivateLoRA's placement):
# proj_in / proj_out are 1x1 convs in SD 1.x and Linear layers in SD 2.x
TRANSFORMER = [*ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def _with_lora(net, targets=ATTENTION):
    from peft import LoraConfig, inject_adapter_in_model

    net.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets)), net.unet)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:  # off peft's zero init, so every LoRA factor has a gradient
                p.normal_(0, 0.1)
    return net


class GroupNorm32(nn.GroupNorm):
    """guided-diffusion's / ADM's norm (a subclass, as pretrained UNets from other codebases have): computed in float32."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def _groupnorm32(net):
    """``net`` with every GroupNorm replaced by a :class:`GroupNorm32` holding the same weights."""
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.GroupNorm:
                new = GroupNorm32(child.num_groups, child.num_channels, eps=child.eps, affine=child.affine)
                new.load_state_dict(child.state_dict())
                setattr(module, name, new)
    assert any(isinstance(m, GroupNorm32) for m in net.modules())
    return net


CASES = {  # name: (build the net, trainable selection or "lora", condition)
    "pixel-attention+class": (lambda: DiffusersUNetNet(tiny_pixel_unet()), ["attentions", "class_embedding"], "labels"),
    "sd-all": (lambda: DiffusersUNetNet(tiny_sd_unet()), ["all"], "text"),
    "sd-attentions (DP-LDM)": (lambda: DiffusersUNetNet(tiny_sd_unet()), ["attentions"], "text"),
    "sd-cross-attention+time": (
        lambda: DiffusersUNetNet(tiny_sd_unet()),
        ["cross_attention", "time_embedding"],
        "text",
    ),
    "sd-lora": (lambda: DiffusersUNetNet(tiny_sd_unet()), "lora", "text"),
    "sd-all, GroupNorm32 norms": (lambda: _groupnorm32(DiffusersUNetNet(tiny_sd_unet())), ["all"], "text"),
    "sd2-all (linear projections)": (lambda: DiffusersUNetNet(tiny_sd_unet(layout="sd2")), ["all"], "text"),
    "sd-lora, transformer targets": (lambda: DiffusersUNetNet(tiny_sd_unet()), "lora-transformer", "text"),
    "sd2-lora, transformer targets": (
        lambda: DiffusersUNetNet(tiny_sd_unet(layout="sd2")),
        "lora-transformer",
        "text",
    ),
}


pytestmark = pytest.mark.usefixtures("deterministic_kernels")


@pytest.mark.parametrize(
    "case,prediction_type",
    [
        ("pixel-attention+class", "epsilon"),
        ("sd-all", "epsilon"),
        ("sd-attentions (DP-LDM)", "v_prediction"),
        ("sd-cross-attention+time", "epsilon"),
        ("sd-lora", "v_prediction"),
        ("sd-all, GroupNorm32 norms", "epsilon"),
        ("sd2-all (linear projections)", "v_prediction"),
        ("sd-lora, transformer targets", "epsilon"),
        ("sd2-lora, transformer targets", "v_prediction"),
    ],
)
def test_per_example_gradients_on_real_diffusers_blocks(case, prediction_type):
    build, trainable, cond_kind = CASES[case]
    net = jitter(build(), 1)
    if isinstance(trainable, str):  # "lora" or "lora-transformer"
        net = _with_lora(net, TRANSFORMER if trainable == "lora-transformer" else ATTENTION)
    else:
        select_trainable(net, trainable)
    sched = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )
    den = VPDenoiser(net, schedule=DiscreteSchedule.from_config(sched.config))
    B, K = 3, 2
    g = torch.Generator().manual_seed(5)
    channels = net.unet.config.in_channels
    x0 = torch.randn(B, channels, 8, 8, generator=g)
    sigma = DiscreteSigma(den.schedule)((B, K), generator=g)
    noise = torch.randn(B, K, channels, 8, 8, generator=g)
    cond = torch.randint(0, 3, (B, K), generator=g) if cond_kind == "labels" else torch.randn(B, K, 5, 12, generator=g)

    def batch_loss(m):
        return _loss(m, x0, cond, sigma, noise)

    def row_loss(m, b):
        return _loss(m, x0[b : b + 1], cond[b : b + 1], sigma[b : b + 1], noise[b : b + 1])

    assert_same(den, batch_loss, row_loss, B, K, 1e-3)


def _loss(den, x0, cond, sigma, noise):
    """The per-example loss with a per-draw condition: labels [B, K] or text states [B, K, L, D]."""
    if cond.ndim == 2:
        return denoising_loss(den, x0, cond, sigma=sigma, noise=noise)
    B, K = sigma.shape
    states = cond.reshape(B * K, *cond.shape[2:])
    return denoising_loss(
        lambda x, s, _: den(x, s, states), x0, None, sigma=sigma, noise=noise, loss_weight=den.loss_weight
    )


def test_frozen_parameters_stay_bitwise_equal_through_a_private_step():
    net = jitter(DiffusersUNetNet(tiny_sd_unet()), 2)
    chosen = set(select_trainable(net, ["attentions"]))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    sched = DDPMScheduler()
    den = VPDenoiser(net, schedule=DiscreteSchedule.from_config(sched.config))
    bk = BookKeeping(den, max_grad_norm=1e-2)
    g = torch.Generator().manual_seed(0)
    x0, cond = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 1, 5, 12, generator=g)
    sigma, noise = DiscreteSigma(den.schedule)((3, 1), generator=g), torch.randn(3, 1, 4, 8, 8, generator=g)
    with bk.recording():
        loss = _loss(den, x0, cond, sigma, noise)
    bk.clipped_backward(loss)
    torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1.0).step()
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]) != (n in chosen), n  # trained ones moved, frozen ones are bitwise equal
    assert chosen and all("attentions." in n for n in chosen)


def test_load_a_local_unet_and_a_pipeline_with_their_schedules(tmp_path):
    unet = tiny_pixel_unet()
    unet.save_pretrained(tmp_path / "ddpm")
    DDPMScheduler(beta_schedule="linear").save_config(tmp_path / "ddpm")
    net, schedule = load_pretrained_unet(tmp_path / "ddpm")
    assert (
        isinstance(net.unet, UNet2DModel)
        and schedule.beta_schedule == "linear"
        and schedule.prediction_type == "epsilon"
    )
    for a, b in zip(net.parameters(), unet.parameters()):
        assert torch.equal(a, b)

    pipe = tmp_path / "pipe"
    tiny_sd_unet().save_pretrained(pipe / "unet")
    DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction").save_config(pipe / "scheduler")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    net, schedule = load_pretrained_unet(pipe)
    assert isinstance(net.unet, UNet2DConditionModel) and schedule.prediction_type == "v_prediction"


def test_bad_pretrained_directories_give_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_pretrained_unet(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a diffusers UNet directory"):
        load_pretrained_unet(tmp_path / "empty")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="without a unet/"):
        load_pretrained_unet(tmp_path / "pipe")
    tiny_pixel_unet().save_pretrained(tmp_path / "nosched")
    with pytest.raises(ValueError, match="scheduler_config.json"):
        load_pretrained_unet(tmp_path / "nosched")
    with pytest.raises(ValueError, match="matches no parameter"):
        select_trainable(
            DiffusersUNetNet(tiny_pixel_unet()), ["cross_attention"]
        )  # a pixel UNet has no cross-attention


def _generate(pipe):
    return pipe(
        "a cat",
        num_inference_steps=2,
        height=16,
        width=16,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


def test_exported_pipeline_loads_and_generates_with_the_trained_unet(tmp_path):
    from diffusers import DiffusionPipeline

    from tests.helpers import tiny_sd_pipeline

    base = tiny_sd_pipeline(tmp_path / "base")
    net, _ = load_pretrained_unet(tmp_path / "base")
    select_trainable(net, ["attentions"])
    with torch.no_grad():  # stands in for a private fine-tuning step
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    export_pipeline(net, base=tmp_path / "base", out=tmp_path / "out")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out", local_files_only=True)
    for a, b in zip(pipe.unet.parameters(), net.unet.parameters()):
        assert torch.equal(a, b)
    assert not np.allclose(_generate(pipe), _generate(base))
    with pytest.raises(ValueError, match="already exists"):
        export_pipeline(net, base=tmp_path / "base", out=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []  # no temporary left behind


def test_exported_lora_loads_into_a_fresh_base_pipeline_and_changes_it(tmp_path):
    from diffusers import DiffusionPipeline

    from tests.helpers import tiny_sd_pipeline

    tiny_sd_pipeline(tmp_path / "base")
    net, _ = load_pretrained_unet(tmp_path / "base")
    trainable = add_lora(net, rank=2, alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    export_lora(net, out=tmp_path / "lora")
    fresh = DiffusionPipeline.from_pretrained(tmp_path / "base", local_files_only=True)
    before = _generate(fresh)
    fresh.load_lora_weights(tmp_path / "lora")
    assert not np.allclose(_generate(fresh), before)
    merged = export_pipeline(net, base=tmp_path / "base", out=tmp_path / "merged")  # LoRA merged into a plain UNet
    pipe = DiffusionPipeline.from_pretrained(merged, local_files_only=True)
    np.testing.assert_allclose(_generate(pipe), _generate(fresh), atol=1e-4)
