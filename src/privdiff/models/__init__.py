"""Denoiser networks (diffusers UNets) sized by the recipe."""

from .unet import UNetConfig, UNetNet, build_unet, count_parameters

__all__ = ["UNetConfig", "UNetNet", "build_unet", "count_parameters"]
