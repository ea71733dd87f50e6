"""Per-sample gradients with Opacus, made correct for non-contiguous convolution inputs.

Opacus' hooks-mode convolution grad sampler (``opacus.grad_sample.conv``) builds its im2col
view with ``as_strided`` and hard-codes the strides of a *contiguous* NCHW tensor
(``opacus.utils.tensor_utils.unfold2d``). A channels-last or permuted activation therefore gives
silently wrong per-sample gradients (all zeros for some layers) while ``p.grad`` stays right.
diffusers' attention blocks end in ``transpose(...).reshape(...)``, so every convolution after
an attention block in a ``UNet2DModel`` is hit. We fix it where it goes wrong: the activation the
sampler unfolds is made contiguous before the stock sampler runs.
"""

from __future__ import annotations

import functools

import torch
from opacus.grad_sample import GradSampleModule
from torch import nn

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _contiguous_activations(sampler):
    @functools.wraps(sampler)
    def grad_sampler(layer, activations, backprops):
        # The stock sampler's im2col assumes contiguous NCHW strides; give it exactly that.
        return sampler(layer, [a.contiguous() for a in activations], backprops)

    grad_sampler.__privdiff_contiguous__ = True
    return grad_sampler


def install_contiguous_conv_grad_samplers() -> None:
    """Replace Opacus' Conv1d/2d/3d grad samplers by ones that first make inputs contiguous.

    Idempotent. Called by every privdiff code path that builds a ``GradSampleModule``, so no
    model privdiff trains privately can reach the wrong sampler.
    """
    for conv in _CONV_TYPES:
        sampler = GradSampleModule.GRAD_SAMPLERS[conv]
        if not getattr(sampler, "__privdiff_contiguous__", False):
            GradSampleModule.GRAD_SAMPLERS[conv] = _contiguous_activations(sampler)


def make_grad_sample_module(module: nn.Module, *, grad_sample_mode: str = "hooks") -> GradSampleModule:
    """Wrap ``module`` so that backward fills ``p.grad_sample`` with per-row gradients of a summed loss.

    Args:
        module: the model to train privately (validated by Opacus: no BatchNorm, no buffers on
            modules that own trainable parameters).
        grad_sample_mode: ``"hooks"`` (Opacus' layer samplers, with the contiguity fix) or
            ``"functorch"`` (``vmap(grad)`` for every layer).

    ``loss_reduction="sum"`` is deliberate: privdiff's losses return one value per example and
    backpropagate their sum, so row gradients are exactly per-example gradients (no hidden
    rescaling by the physical batch size).
    """
    from opacus.validators import ModuleValidator

    from .clipping import refuse_row_mixing

    refuse_row_mixing(module)  # Opacus' validator checks trainable modules only
    errors = ModuleValidator.validate(module, strict=False)
    if errors:
        raise ValueError(f"model cannot be trained with DP-SGD: {errors[0]}")
    install_contiguous_conv_grad_samplers()
    if grad_sample_mode not in ("hooks", "functorch"):
        raise ValueError(f"grad_sample_mode must be 'hooks' or 'functorch', got {grad_sample_mode!r}")
    return GradSampleModule(
        module, batch_first=True, loss_reduction="sum", force_functorch=grad_sample_mode == "functorch"
    )


def per_sample_grads(module: GradSampleModule) -> dict[str, torch.Tensor]:
    """The per-sample gradients currently held by ``module``, keyed by parameter name."""
    return {
        name: p.grad_sample
        for name, p in module._module.named_parameters()
        if p.requires_grad and getattr(p, "grad_sample", None) is not None
    }
