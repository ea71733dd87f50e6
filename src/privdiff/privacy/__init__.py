"""DP-SGD on Opacus, accountants, the privacy ledger."""

from .accounting import calibrate_noise, epsilon
from .central import CentralRelease, release_central_images
from .dpsgd import DPSGD, NonPrivateSGD, PoissonBatches, fold_noise_multiplicity
from .grad_sample import install_contiguous_conv_grad_samplers, make_grad_sample_module
from .ledger import Ledger

__all__ = [
    "CentralRelease",
    "DPSGD",
    "Ledger",
    "NonPrivateSGD",
    "PoissonBatches",
    "calibrate_noise",
    "epsilon",
    "fold_noise_multiplicity",
    "install_contiguous_conv_grad_samplers",
    "make_grad_sample_module",
    "release_central_images",
]
