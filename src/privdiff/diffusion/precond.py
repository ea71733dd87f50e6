"""EDM preconditioning: the denoiser D(x; σ) built around a raw network F.

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models" (EDM), Table 1 and §5:

    D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ))

with training weight λ(σ) = 1 / c_out(σ)², which makes the effective target of F
unit-variance at every noise level.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["Denoiser"]

Parameterization = Literal["edm", "v"]


class Denoiser(nn.Module):
    """D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ), labels)  (EDM Table 1).

    Two parameterizations are supported:

    * ``"edm"`` (EDM Table 1): c_skip = σd²/(σ²+σd²), c_out = σ·σd/√(σ²+σd²),
      c_in = 1/√(σ²+σd²), c_noise = ¼·ln σ.
    * ``"v"`` (v-prediction, Salimans & Ho 2022, as used by DPDM at small ε): same
      c_skip and c_in, c_out = −σ·σd/√(σ²+σd²) and c_noise = (2/π)·atan(σ/σd), the
      time t of the cosine schedule.

    The default σd = √(1/3) is the std of uniform data on [-1, 1] (DPDM's choice; EDM
    uses 0.5). The module owns no parameters and no buffers of its own, only ``net``:
    Opacus refuses buffers on modules with parameters.

    Args:
        net: Raw network F, called as ``net(x_in, c_noise, labels)`` with ``x_in``
            [B, C, H, W], ``c_noise`` [B] float and ``labels`` [B] long or ``None``;
            returns F of shape [B, C, H, W].
        sigma_data: σd, the standard deviation of the data.
        parameterization: ``"edm"`` or ``"v"``.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        sigma_data: float = math.sqrt(1.0 / 3.0),
        parameterization: Parameterization = "edm",
    ) -> None:
        super().__init__()
        if parameterization not in ("edm", "v"):
            raise ValueError(f"parameterization must be 'edm' or 'v', got {parameterization!r}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.net = net
        self.sigma_data = float(sigma_data)
        self.parameterization: Parameterization = parameterization

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Preconditioning coefficients (EDM Table 1) for noise levels ``sigma``.

        Computed in ``sigma``'s dtype and shape (``forward`` passes float32 [B]).

        Args:
            sigma: Noise levels σ > 0, shape [B].

        Returns:
            ``(c_skip, c_out, c_in, c_noise)``, each shaped like ``sigma``.
        """
        sigma_data = self.sigma_data
        # c_skip = σd² / (σ² + σd²): how much of the noisy input to pass straight through
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        # c_out = ±σ·σd / √(σ² + σd²): scale of the network output (sign flip for v-prediction)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
        # c_in = 1 / √(σ² + σd²): unit-variance network input
        c_in = 1.0 / (sigma**2 + sigma_data**2).sqrt()
        if self.parameterization == "edm":
            # c_noise = ¼ ln σ
            c_noise = 0.25 * sigma.log()
        else:
            c_out = -c_out
            # c_noise = (2/π) atan(σ/σd): the cosine-schedule time t ∈ (0, 1)
            c_noise = (2.0 / math.pi) * torch.atan(sigma / sigma_data)
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """Denoise ``x`` at noise level ``sigma``.

        Args:
            x: Noisy images [B, C, H, W].
            sigma: Noise level per example [B], or a scalar broadcast over the batch.
            labels: Class labels [B] (long) or ``None`` for an unconditional net.

        Returns:
            D(x; σ), same shape as ``x``, in float32.
        """
        x = x.to(torch.float32)
        batch = x.shape[0]
        # σ in float32 on x's device, one value per example
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.expand(batch) if sigma.ndim == 0 else sigma.reshape(-1)
        if sigma.shape[0] != batch:
            raise ValueError(f"sigma has {sigma.shape[0]} entries for a batch of {batch}")
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        view = (batch,) + (1,) * (x.ndim - 1)
        c_skip, c_out, c_in = c_skip.view(view), c_out.view(view), c_in.view(view)
        # F(c_in·x; c_noise, labels)
        F_x = self.net(c_in * x, c_noise, labels)
        # D = c_skip·x + c_out·F
        return c_skip * x + c_out * F_x.to(torch.float32)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """Training weight λ(σ) = 1 / c_out(σ)² = (σ² + σd²) / (σ·σd)²  (EDM eq. 8, Table 1).

        Same for both parameterizations (c_out differs only in sign).
        """
        sigma_data = self.sigma_data
        return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2

    def extra_repr(self) -> str:
        return f"sigma_data={self.sigma_data:.6g}, parameterization={self.parameterization!r}"
