"""The denoiser of a run: the device it runs on, the recipe's preconditioning around a network, a fresh
pixel network, and a trained run's EMA denoiser and (for latent runs) its decoder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DModel

from ..config import Recipe
from ..data import ImageDataset
from ..diffusion import Denoiser
from ..diffusion.discrete import VPDenoiser
from ..models import UNetNet, build_unet
from ..models.pretrained import DiffusersUNetNet, load_pipeline_vae
from ..runs import Run

__all__ = ["default_device", "load_decoder", "load_denoiser", "make_denoiser", "pixel_net"]


def default_device() -> torch.device:
    """CUDA when present, else CPU: privdiff never requires a GPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_denoiser(recipe: Recipe, net: torch.nn.Module) -> Denoiser | VPDenoiser:
    """Wrap a network in its preconditioning: a user's pretrained diffusers UNet keeps the objective it was
    trained with (:class:`~privdiff.diffusion.discrete.VPDenoiser` on its own β schedule and prediction type);
    privdiff's own nets (a ``UNet2DModel``, or a ``net(x, c_noise, cond)`` module) take the recipe's (EDM or v)."""
    if isinstance(net, DiffusersUNetNet):
        return VPDenoiser(net, schedule=net.schedule)
    if isinstance(net, UNet2DModel):
        net = UNetNet(net)
    return Denoiser(net, sigma_data=recipe.diffusion.sigma_data, parameterization=recipe.diffusion.parameterization)


def pixel_net(recipe: Recipe, dataset: ImageDataset) -> UNetNet:
    """A fresh pixel-space denoiser network for ``dataset`` from ``recipe.model`` (DPDM's, DPP's, LoRA's base)."""
    return UNetNet(
        build_unet(
            recipe.model, resolution=dataset.resolution, in_channels=dataset.channels, num_classes=dataset.num_classes
        )
    )


def load_denoiser(run: Run, recipe: Recipe | None = None) -> Denoiser:
    """The EMA denoiser of a run's latest checkpoint, on the default device, in eval mode."""
    recipe = recipe or run.load_config()
    net = run.load_net(ema=True).to(default_device()).eval()
    return make_denoiser(recipe, net)


def load_decoder(run: Run) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Latents → images in [-1, 1] for a latent-diffusion run: its own autoencoder (DP-LDM), or the frozen VAE of
    the pipeline it fine-tuned (``model.pretrained`` with a ``vae/``); None for a pixel-space run."""
    path = run.path / "autoencoder"
    if path.is_dir():
        ae = AutoencoderKL.from_pretrained(path, local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False)
    else:
        pretrained = run.load_config().model.pretrained
        if not pretrained or not (Path(pretrained) / "model_index.json").is_file():
            return None
        ae = load_pipeline_vae(pretrained)
    ae = ae.to(default_device()).eval().requires_grad_(False)
    return lambda z: ae.decode(z / ae.config.scaling_factor).sample
