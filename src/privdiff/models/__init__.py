"""Denoiser networks (diffusers UNets) sized by the recipe, DP-LDM's autoencoder, latent UNet and text encoder,
and the HE-friendly latent denoiser of encrypted inference (:mod:`privdiff.models.he_net`)."""

from .unet import UNetConfig, UNetNet, build_unet, count_parameters

__all__ = ["UNetConfig", "UNetNet", "build_unet", "count_parameters"]
