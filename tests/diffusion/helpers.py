"""Shared test fixtures for privdiff.diffusion: tiny nets and the exact Gaussian denoiser."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyNet(nn.Module):
    """A small conditional F(x_in; c_noise, labels) made of Opacus-supported layers."""

    def __init__(self, channels: int = 2, num_classes: int = 5, hidden: int = 4) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.noise_emb = nn.Linear(1, hidden)
        self.label_emb = nn.Embedding(num_classes + 1, hidden)  # last index = null label
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x_in: Tensor, c_noise: Tensor, labels: Tensor | None) -> Tensor:
        h = self.conv_in(x_in) + self.noise_emb(c_noise[:, None])[:, :, None, None]
        if labels is not None:
            h = h + self.label_emb(labels)[:, :, None, None]
        return self.conv_out(torch.tanh(h))


class RecordingNet(nn.Module):
    """F = a·x_in + b·c_noise (+ 0.1·label) that records every call's inputs."""

    def __init__(self, a: float = 0.7, b: float = -0.4) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.calls: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def forward(self, x_in: Tensor, c_noise: Tensor, labels: Tensor | None) -> Tensor:
        self.calls.append((x_in.detach().clone(), c_noise.detach().clone(), None if labels is None else labels.clone()))
        out = self.a * x_in + self.b * c_noise.view(-1, 1, 1, 1)
        if labels is not None:
            out = out + 0.1 * labels.to(x_in.dtype).view(-1, 1, 1, 1)
        return out


class GaussianDenoiser:
    """Exact denoiser for data x ~ N(mu, s^2) per pixel: D(x; σ) = mu + s²/(s²+σ²)·(x − mu)."""

    def __init__(self, mu: float = 0.3, s: float = 0.5) -> None:
        self.mu, self.s = mu, s
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.calls += 1
        assert sigma.shape == (x.shape[0],), sigma.shape
        sigma = sigma.view(-1, *([1] * (x.ndim - 1)))
        return self.mu + self.s**2 / (self.s**2 + sigma**2) * (x - self.mu)

    def ode_solution(self, x_T: Tensor, *, sigma_max: float, sigma: float = 0.0) -> Tensor:
        """Exact PF-ODE solution x(σ) = mu + √(s²+σ²)/√(s²+σ_max²)·(x_T − mu)."""
        s = self.s
        return self.mu + ((s**2 + sigma**2) / (s**2 + sigma_max**2)) ** 0.5 * (x_T - self.mu)
