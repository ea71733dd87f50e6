"""Loading a saved denoiser network by what its directory holds (the one place that knows every kind)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .he_net import HENet
from .latent import LatentNet
from .lora import LoRAUNetNet
from .pretrained import DiffusersUNetNet
from .unet import UNetNet

__all__ = ["load_net"]


def load_net(path: str | Path) -> nn.Module:
    """The denoiser network saved in directory ``path``: a :class:`UNetNet`, a LoRA-adapted one, a DP-LDM
    ``LatentNet``, the HE-friendly ``HENet``, or a user's pretrained diffusers UNet (``DiffusersUNetNet``)."""
    path = Path(path)
    if (path / "he_net.json").is_file():  # the HE-friendly latent denoiser (private-mode inference)
        return HENet.from_pretrained(path)
    if (path / "conditioner.json").is_file():
        return LatentNet.from_pretrained(path)
    if (path / DiffusersUNetNet.MARKER).is_file():  # a user's pretrained diffusers UNet, fine-tuned
        return DiffusersUNetNet.from_pretrained(path)
    if (path / "lora" / "adapter.json").is_file():
        return LoRAUNetNet.from_pretrained(path)
    return UNetNet.from_pretrained(path)
