"""Diffusion math: EDM preconditioning, training noise, losses and samplers.

Pure diffusion code on any ``net`` callable; nothing here knows about privacy,
model architectures or data sets.
"""

from .losses import denoising_loss, draw_training_noise, drop_labels
from .noise import (
    SIGMA_DISTRIBUTIONS,
    CosineLogSNRSigma,
    LogNormalSigma,
    SigmaDistribution,
    make_sigma_distribution,
)
from .precond import Denoiser
from .samplers import (
    SAMPLERS,
    guided_denoiser,
    karras_sigmas,
    sample,
    sample_euler,
    sample_heun,
)

__all__ = [
    "Denoiser",
    "LogNormalSigma",
    "CosineLogSNRSigma",
    "SigmaDistribution",
    "SIGMA_DISTRIBUTIONS",
    "make_sigma_distribution",
    "draw_training_noise",
    "drop_labels",
    "denoising_loss",
    "karras_sigmas",
    "sample_euler",
    "sample_heun",
    "SAMPLERS",
    "sample",
    "guided_denoiser",
]
