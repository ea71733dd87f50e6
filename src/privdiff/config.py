"""Recipes: nested dataclasses are the single source of truth for every key and its default.

A recipe YAML and ``key=value`` overrides (dotted paths, as DPDM's OmegaConf command line) are
merged over the defaults; an unknown key, a key given twice in one mapping, a section given as a
scalar, a value of the wrong type or out of its range is an error, never ignored.

Every numeric key has its range in one table, :data:`RANGES` (finite unless it says otherwise), that
recipe files, ``key=value`` overrides, a run's ``config.yaml`` and the command line's flags that set a
recipe key (:func:`parse_value`) all go through; :func:`validate_recipe` adds the checks that relate
keys to each other. A recipe is checked whole when it is resolved, before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data.splits import absolute_root, check_split_options
from .diffusion.samplers import SAMPLERS
from .diffusion.schedulers import SCHEDULERS
from .method_registry import METHODS
from .models.autoencoder import AutoencoderConfig
from .models.he_net import HENetConfig
from .models.latent import LatentUNetConfig
from .models.text import TextConfig
from .models.unet import UNetConfig

EVALUATE_FEATURES = (
    "public",
    "photos",
    "train",
)  # the feature CNN of privdiff evaluate (privdiff.evaluation.evaluate.feature_network)
PROXY_FEATURES = ("map", "loss")  # what the proxy attacker h_ω reads (privdiff.core.proxy.proxy_features)


class RecipeError(ValueError):
    """A recipe or override that cannot be resolved (unknown key, wrong type, bad value)."""


@dataclass(frozen=True)
class DataConfig:
    name: str = "mnist5k"  # mnist5k | digits | mnist | fashion-mnist | cifar10 | folder
    root: str | None = None  # where the files of mnist/fashion-mnist/cifar10/folder are
    resolution: int | None = (
        None  # resize to this (square); None: the data's own size (a recipe file's value is dropped when an override names other data)
    )
    holdout: float | None = (
        None  # data without a test split (folder): this fraction, per class, is its test split, never trained on
    )
    holdout_seed: int = 0  # seed of that held-out draw (the same seed, the same parts)
    test_root: str | None = None  # data without a test split (folder): a folder or .zip read as its test split instead
    # a text pipeline on class-labelled data: each image's caption is this template with {} its class name
    # ("a photo of a {}"); null: captions from data.root's metadata.jsonl or caption files
    prompt_template: str | None = None


@dataclass(frozen=True)
class ModelConfig(UNetConfig):
    pass


@dataclass(frozen=True)
class DiffusionConfig:
    parameterization: str = "edm"  # edm | v  (DPDM uses v at small epsilon)
    sigma_data: float = math.sqrt(1 / 3)  # std of uniform data on [-1, 1], as DPDM
    sigma_distribution: str = "lognormal"  # lognormal (EDM) | cosine (DPDM's v: more mass at high sigma)
    P_mean: float = -1.2
    P_std: float = 1.2
    logsnr_min: float = -9.0
    logsnr_max: float = 13.0
    label_dropout: float = 0.1  # classifier-free guidance: p of training with the null label


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = True
    epsilon: float = 10.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # C: per-example clipping norm
    noise_multiplicity: int = 4  # K: noise draws per example, averaged before clipping
    accountant: str = "rdp"  # rdp | prv
    grad_sample_mode: str = "bk"  # bk: privdiff's one-backward book-keeping clipping | Opacus per-sample: hooks (with privdiff's conv fix), functorch


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 256  # expected logical batch size (Poisson: q = batch_size / N)
    epochs: float = 50.0  # expected epochs of the private stage; sets the planned steps
    max_steps: int | None = None  # stop after this many steps (smoke runs)
    lr: float = 1e-3
    lr_schedule: str = "constant"  # constant | cosine (decays to 5% of lr over the planned steps)
    ema_decay: float = 0.999
    max_physical_batch_size: int = 512  # rows (examples x K) per forward/backward
    precision: str = "fp32"  # fp32 | bf16: the forward/backward under bfloat16 autocast (clipping and noise stay fp32)
    checkpoint_every: int = 50  # steps
    seed: int = 0


@dataclass(frozen=True)
class SamplerConfig:
    name: str = "heun"  # heun/edm (EDM Algorithm 2) | euler/ddim
    # a pretrained pipeline's own diffusers scheduler instead (pipeline | ddim | pndm | plms | euler | euler-ancestral |
    # dpm-solver | ddpm), on the net's timesteps with its scheduler config; null: privdiff's sampler (name, sigma_*, rho)
    scheduler: str | None = None
    steps: int = 32
    guidance: float = 0.0  # classifier-free guidance scale w
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = float("inf")
    S_noise: float = 1.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0


@dataclass(frozen=True)
class EvaluateConfig:
    """How ``privdiff evaluate`` judges a run; changing it never changes what training did."""

    n_samples: int = 10_000  # synthetic images drawn (balanced over classes)
    features: str = "public"  # public: feature CNN trained on public_data (photos when its channels differ from the data's) | photos: on crops of public photos | train: on the real training split (recorded as such)
    public_data: str = "digits"  # the public data set of the feature CNN (features=public)
    public_root: str | None = None
    feature_epochs: int | None = (
        None  # epochs of the feature CNN (None: 30 on public_data or train, 10 on photos); never classifier_epochs
    )
    feature_patches: int = 6000  # photo crops the photos feature CNN trains on
    classifier_epochs: int = 30  # downstream CNN / logistic regression (DPDM: 50)
    classifier_lr: float = 1e-3  # Adam (DPDM: 3e-4 over 50 epochs)
    holdout: float = 0.1  # fraction of the (synthetic or real-train) data held out to select the epoch
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    pr_k: int = 3  # k-th nearest neighbour radius of improved precision/recall
    max_real: int | None = None  # cap on real images per split in the image metrics (seeded subset); None: all


@dataclass(frozen=True)
class PretrainConfig(TrainConfig):
    """The public pretraining of DP-LDM's latent model (non-private); same keys as ``train``."""

    batch_size: int = 128
    epochs: float = 150.0
    lr: float = 2e-3
    ema_decay: float = 0.995


@dataclass(frozen=True)
class LDMConfig:
    """DP-LDM (``method: dp-ldm``): public autoencoder and latent model, private fine-tuning of ``trainable``."""

    public_data: str = "digits"  # public data set of the autoencoder and the pretraining (never the private one)
    public_root: str | None = None
    public_size: int | None = None  # glyphs only: examples in its training split (null: 6,000)
    public_margin: int = 4  # public images are drawn this many pixels inside a background frame (MNIST's layout)
    public_contrast: float = 0.0  # g of x <- tanh(g x)/tanh(g) on the public images (0: unchanged)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: LatentUNetConfig = field(default_factory=LatentUNetConfig)
    text: TextConfig = field(default_factory=TextConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    trainable: tuple[str, ...] = (
        "attentions",
        "class_embedder",
    )  # privately fine-tuned (privdiff.models.latent.TRAINABLE_GROUPS or name patterns)
    net: str = "unet"  # the latent denoiser: "unet" (ldm.unet) or "he", the HE-friendly one of privdiff.models.he_net (ldm.he; private-mode inference)
    he: HENetConfig = field(default_factory=HENetConfig)


@dataclass(frozen=True)
class DPPConfig:
    """DPP (``method: dpp``): noisy central images released privately, pretraining on them, then DP-SGD."""

    batch_size: int = 1000  # expected examples per release round (Poisson: q = batch_size / N)
    noise_multiplier: float = 5.0  # σ of the release (DP-FETA: 5)
    rounds: int = 5  # R release rounds: R × num_classes central images (DP-FETA MNIST: 5)
    downsample: int = 2  # average-pool the images by this before taking means (fewer values, less noise per image)
    copies: int = 100  # augmented copies of each central image for pretraining (post-processing)
    num_ops: int = 2  # RandAugment-style operations per copy
    magnitude: int = 9  # their strength is drawn in 1..magnitude (of 10)
    pretrain: PretrainConfig = field(
        default_factory=lambda: PretrainConfig(batch_size=128, epochs=20.0, lr=2e-3, ema_decay=0.995)
    )
    # a public warm start before the central images (stage public_pretrain; keys as dpdm.public_*): null: none
    public_data: str | None = None
    public_root: str | None = None
    public_size: int | None = None
    public_margin: int = 4
    public_contrast: float = 2.5
    public_pretrain: PretrainConfig = field(
        default_factory=lambda: PretrainConfig(batch_size=128, epochs=40.0, lr=2e-3, ema_decay=0.995)
    )


@dataclass(frozen=True)
class DPDMConfig:
    """DPDM (``method: dpdm``): an optional public warm start of the pixel UNet before DP-SGD (PDP-Diffusion)."""

    public_data: str | None = None  # public data of the warm start (glyphs, digits; never the private set); null: none
    public_root: str | None = None
    public_size: int | None = None  # as ldm.public_size
    public_margin: int = 4  # as ldm.public_margin (glyphs are drawn in MNIST's frame already: give them 0)
    public_contrast: float = 2.5  # as ldm.public_contrast (glyphs: 0)
    pretrain: PretrainConfig = field(  # LoRA's: the same public data and model share one cached stage
        default_factory=lambda: PretrainConfig(batch_size=128, epochs=40.0, lr=2e-3, ema_decay=0.995)
    )


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA fine-tuning (``method: lora``) of a UNet pretrained on public data, toward a small private
    member set, plain or defended against membership inference (PrivateLoRA, Luo et al. AAAI 2025)."""

    public_data: str = "digits"  # public data set of the pretraining (never the private one)
    public_root: str | None = None
    public_size: int | None = None  # as ldm.public_size
    public_margin: int = 4  # as ldm.public_margin: public digits drawn inside a background frame
    public_contrast: float = 2.5  # as ldm.public_contrast
    pretrain: PretrainConfig = field(
        default_factory=lambda: PretrainConfig(batch_size=128, epochs=40.0, lr=2e-3, ema_decay=0.995)
    )
    rank: int = 8  # r
    alpha: float = 4.0  # α (scale α/r)
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")  # peft target_modules
    n_per_role: int = 128  # examples in each of member_aux, member_test, nonmember_aux, nonmember_test (members: 2x)
    objective: str = "lora"  # lora | privatelora (L_ada - lam*CE, min-max) | stable (L_ada / (1 + lam*CE + delta))
    lam: float = 0.05  # λ (paper 0.05; released scripts 1)
    stabilizer: float = 1e-5  # δ of Stable PrivateLoRA
    attacker_lr: float = 1e-4  # Adam lr of the proxy attacker h_ω (paper 1e-5 on 433 steps/epoch x 400 epochs)
    attacker_weight_decay: float = 1e-4
    attacker_batch: int = 8  # members and as many non-members per attacker step (paper: 1 + 1)
    attacker_steps: int = 1  # attacker steps per LoRA step (k)
    attacker_feature: str = (
        "map"  # map (the paper's squared-error map at sigma ~ p_train) | loss (log mean error at a Goldilocks t)
    )


@dataclass(frozen=True)
class Recipe:
    method: str = "dpdm"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    dpdm: DPDMConfig = field(default_factory=DPDMConfig)
    ldm: LDMConfig = field(default_factory=LDMConfig)
    dpp: DPPConfig = field(default_factory=DPPConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


# -- YAML ---------------------------------------------------------------------------------------------
class _RecipeLoader(yaml.SafeLoader):
    """YAML as a recipe reads it: a key given twice in one mapping is an error (never "the last one
    wins", at any level), and a number with an exponent but no dot (``1e-5``) is a float, as in YAML 1.2
    (YAML 1.1 reads it as the string "1e-5")."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' merges are overridden by design
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {first.line + 1})", key_node.start_mark
                    )
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader)


def _yaml_problem(e: Exception) -> str:
    """One line for a YAML error: its problem and where (line, column)."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{e.problem}{where}"
    return (str(e).splitlines() or [type(e).__name__])[0]


# -- ranges -------------------------------------------------------------------------------------------
INT_MAX = 2**31 - 1  # sizes and counts: larger is never meant (and overflows tensors' int32 indices)


@dataclass(frozen=True)
class Bound:
    """The range of a numeric value (of each element, for a tuple): finite unless ``inf`` allows +∞.

    ``lo``/``hi`` are inclusive unless ``lo_open``/``hi_open``; ``min_len`` is a tuple's least length.
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    inf: bool = False
    min_len: int = 0

    def describe(self) -> str:
        def fmt(x: float) -> str:
            return "inf" if math.isinf(x) else str(int(x)) if float(x).is_integer() and abs(x) < 1e20 else f"{x:g}"

        lo = None if self.lo is None else fmt(self.lo)
        hi = None if self.hi is None else fmt(self.hi)
        if lo is not None and hi is not None:
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if hi is not None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return "finite"

    def contains(self, v: Any) -> bool:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return False
        if isinstance(v, float) and (math.isnan(v) or (math.isinf(v) and not (self.inf and v > 0))):
            return False
        return (self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)) and (
            self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        )

    def check(self, name: str, value: Any) -> None:
        """Raise :class:`RecipeError` unless ``value`` (a number, a tuple of numbers, or None) is in range."""
        if value is None:
            return
        if isinstance(value, tuple):
            if len(value) < self.min_len:
                raise RecipeError(
                    f"{name} must have at least {self.min_len} element{'s' * (self.min_len > 1)}, got {list(value)}"
                )
            bad = [v for v in value if not self.contains(v)]
            if bad:
                raise RecipeError(
                    f"{name}: every element must be {self._kind(bad[0])} {self.describe()}, got {list(value)}"
                )
        elif not self.contains(value):
            raise RecipeError(f"{name} must be {self._kind(value)} {self.describe()}, got {value!r}")

    def _kind(self, v: Any) -> str:
        if isinstance(v, int) and not isinstance(v, bool):
            return "an integer"
        return "a number (inf allowed)" if self.inf else "a finite number"


POSITIVE = Bound(lo=0, lo_open=True)  # > 0, finite
COUNT = Bound(lo=1, hi=INT_MAX)  # a positive integer
PROBABILITY = Bound(lo=0, hi=1, hi_open=True)  # [0, 1): a dropout rate, a decay
OPEN_UNIT = Bound(lo=0, hi=1, lo_open=True, hi_open=True)  # (0, 1): δ, a held-out fraction
SEED = Bound(lo=0, hi=2**63 - 1)
LR = Bound(lo=0, hi=10, lo_open=True)
EPOCHS = Bound(lo=0, hi=1e6, lo_open=True)
CHANNELS = Bound(lo=1, hi=65536, min_len=1)
CONTRAST = Bound(lo=0, hi=100)

_TRAIN_RANGES = {  # train, and the public pretraining stages (PretrainConfig has train's keys)
    "batch_size": COUNT,
    "epochs": EPOCHS,
    "max_steps": Bound(lo=1, hi=10**12),
    "lr": LR,
    "ema_decay": PROBABILITY,
    "max_physical_batch_size": COUNT,
    "checkpoint_every": COUNT,
    "seed": SEED,
}

RANGES: dict[str, Bound] = {
    "data.resolution": Bound(lo=1, hi=4096),
    "data.holdout": OPEN_UNIT,
    "data.holdout_seed": SEED,
    "model.channels": CHANNELS,
    "model.layers_per_block": Bound(lo=1, hi=64),
    "model.attention_levels": Bound(lo=0, hi=64),
    "model.attention_head_dim": Bound(lo=1, hi=65536),
    "model.norm_num_groups": Bound(lo=1, hi=65536),
    "model.dropout": PROBABILITY,
    "model.lora_rank": Bound(lo=1, hi=65536),
    "model.lora_alpha": Bound(lo=0, hi=1e6, lo_open=True),
    "diffusion.sigma_data": Bound(lo=0, hi=1e4, lo_open=True),
    "diffusion.P_mean": Bound(lo=-20, hi=20),
    "diffusion.P_std": Bound(lo=0, hi=20, lo_open=True),
    "diffusion.logsnr_min": Bound(lo=-50, hi=50),
    "diffusion.logsnr_max": Bound(lo=-50, hi=50),
    "diffusion.label_dropout": PROBABILITY,
    "privacy.epsilon": POSITIVE,
    "privacy.delta": OPEN_UNIT,
    "privacy.max_grad_norm": Bound(lo=0, hi=1e6, lo_open=True),
    "privacy.noise_multiplicity": Bound(lo=1, hi=4096),
    **{f"train.{k}": b for k, b in _TRAIN_RANGES.items()},
    "sampler.steps": Bound(lo=1, hi=100_000),
    "sampler.guidance": Bound(lo=0, hi=1000),
    "sampler.S_churn": Bound(lo=0, hi=1e4),
    "sampler.S_min": Bound(lo=0, hi=1e6),
    "sampler.S_max": Bound(lo=0, inf=True),
    "sampler.S_noise": Bound(lo=0, hi=10),
    "sampler.sigma_min": Bound(lo=0, hi=1e6, lo_open=True),
    "sampler.sigma_max": Bound(lo=0, hi=1e6, lo_open=True),
    "sampler.rho": Bound(lo=0, hi=1000, lo_open=True),
    "evaluate.n_samples": Bound(lo=2, hi=1_000_000),
    "evaluate.feature_epochs": Bound(lo=1, hi=100_000),
    "evaluate.feature_patches": Bound(lo=8, hi=10_000_000),
    "evaluate.classifier_epochs": Bound(lo=1, hi=100_000),
    "evaluate.classifier_lr": LR,
    "evaluate.holdout": OPEN_UNIT,
    "evaluate.kid_subset_size": Bound(lo=2, hi=INT_MAX),
    "evaluate.kid_subsets": COUNT,
    "evaluate.pr_k": COUNT,
    "evaluate.max_real": COUNT,
    **{f"{k}.public_size": COUNT for k in ("dpdm", "ldm", "dpp", "lora")},
    **{f"{k}.public_margin": Bound(lo=0, hi=4096) for k in ("dpdm", "ldm", "dpp", "lora")},
    **{f"{k}.public_contrast": CONTRAST for k in ("dpdm", "ldm", "dpp", "lora")},
    **{f"dpdm.pretrain.{k}": b for k, b in _TRAIN_RANGES.items()},
    "ldm.autoencoder.channels": CHANNELS,
    "ldm.autoencoder.latent_channels": Bound(lo=1, hi=4096),
    "ldm.autoencoder.layers_per_block": Bound(lo=1, hi=64),
    "ldm.autoencoder.norm_num_groups": Bound(lo=1, hi=65536),
    "ldm.autoencoder.kl_weight": Bound(lo=0, hi=1e6),
    "ldm.autoencoder.epochs": EPOCHS,
    "ldm.autoencoder.batch_size": COUNT,
    "ldm.autoencoder.lr": LR,
    "ldm.unet.channels": CHANNELS,
    "ldm.unet.layers_per_block": Bound(lo=1, hi=64),
    "ldm.unet.attention_heads": Bound(lo=1, hi=65536),
    "ldm.unet.norm_num_groups": Bound(lo=1, hi=65536),
    "ldm.text.width": Bound(lo=1, hi=65536),
    "ldm.text.layers": Bound(lo=1, hi=256),
    "ldm.text.heads": Bound(lo=1, hi=65536),
    "ldm.text.max_length": Bound(lo=1, hi=65536),
    "ldm.text.caption_dropout": PROBABILITY,
    **{f"ldm.pretrain.{k}": b for k, b in _TRAIN_RANGES.items()},
    "ldm.he.width": Bound(lo=1, hi=65536),
    "ldm.he.blocks": Bound(lo=1, hi=256),
    "ldm.he.heads": Bound(lo=1, hi=65536),
    "ldm.he.head_dim": Bound(lo=1, hi=65536),
    "ldm.he.mlp_ratio": Bound(lo=1, hi=64),
    "ldm.he.fourier": Bound(lo=1, hi=64),
    "dpp.batch_size": COUNT,
    "dpp.noise_multiplier": Bound(lo=0, hi=1e6, lo_open=True),
    "dpp.rounds": Bound(lo=1, hi=1_000_000),
    "dpp.downsample": Bound(lo=1, hi=4096),
    "dpp.copies": Bound(lo=1, hi=1_000_000),
    "dpp.num_ops": Bound(lo=0, hi=64),
    "dpp.magnitude": Bound(lo=1, hi=10),
    **{f"dpp.pretrain.{k}": b for k, b in _TRAIN_RANGES.items()},
    **{f"dpp.public_pretrain.{k}": b for k, b in _TRAIN_RANGES.items()},
    **{f"lora.pretrain.{k}": b for k, b in _TRAIN_RANGES.items()},
    "lora.rank": Bound(lo=1, hi=65536),
    "lora.alpha": Bound(lo=0, hi=1e6, lo_open=True),
    "lora.n_per_role": COUNT,
    "lora.lam": Bound(lo=0, hi=1e6),
    "lora.stabilizer": Bound(lo=0, hi=1e6, lo_open=True),
    "lora.attacker_lr": LR,
    "lora.attacker_weight_decay": Bound(lo=0, hi=1e3),
    "lora.attacker_batch": COUNT,
    "lora.attacker_steps": Bound(lo=0, hi=1000),
}
"""Every numeric recipe key (int, float, or a tuple of them) -> its range; finite unless ``inf=True``."""


_FLOAT_WORDS = {
    "inf": math.inf,
    "+inf": math.inf,
    ".inf": math.inf,
    "+.inf": math.inf,
    "-inf": -math.inf,
    "-.inf": -math.inf,
    "nan": math.nan,
    ".nan": math.nan,
}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert one YAML value against a dataclass field's type hint (ranges: :data:`RANGES`)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is tuple:
        if isinstance(value, dict) or value is None:
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        if not isinstance(value, (list, tuple)):
            value = [value]
        (elem, *_rest) = typing.get_args(hint)
        return tuple(_coerce(v, elem, key) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise RecipeError(f"{key}: {value} is too large for a float") from None
        if isinstance(value, str):
            word = value.strip().lower()
            if word in _FLOAT_WORDS:  # out of range unless the key allows it (RANGES): never silently taken
                return _FLOAT_WORDS[word]
            try:  # e.g. 1e-5 in a YAML 1.1 file that another tool wrote
                return float(word)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    raise RecipeError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _build(cls: type, values: Any, prefix: str = "") -> Any:
    if not isinstance(values, dict):
        raise RecipeError(f"{prefix.rstrip('.')}: expected a section (a mapping of keys), got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in known:
            raise RecipeError(f"unknown recipe key '{path}' (known under '{prefix or '.'}': {', '.join(known)})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, prefix=f"{path}.")
        else:
            kwargs[key] = _coerce(value, hint, path)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if any(not p.strip() for p in parts):
        raise RecipeError(f"override '{dotted}': empty key in the dotted path")
    node = tree
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override '{dotted}': '{'.'.join(parts[: i + 1])}' was given a value, it is a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["privacy.epsilon=1", "train.batch_size=512"]`` -> nested dict (values parsed as YAML, as a recipe file's).

    The same key given twice: the later one wins, as on any command line (a recipe *file* refuses it).
    """
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise RecipeError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise RecipeError(f"override '{item}' has an empty key")
        try:
            value = _load_yaml(raw) if raw.strip() != "" else None
        except (yaml.YAMLError, ValueError) as e:  # ValueError: e.g. an integer past Python's digit limit
            raise RecipeError(f"override '{item[:200]}': the value is not valid YAML ({_yaml_problem(e)})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], top: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and key in out and not isinstance(out[key], dict):
            raise RecipeError(f"{prefix}{key}: expected a section (a mapping of keys), got {out[key]!r}")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, prefix=f"{prefix}{key}.")
        else:
            out[key] = value
    return out


def key_hint(key: str) -> Any:
    """The type hint of a dotted recipe key (``"sampler.guidance"`` -> float); RecipeError if it is not a key."""
    cls: Any = Recipe
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            raise RecipeError(f"unknown recipe key '{key}'")
        cls = hints[part]
        if dataclasses.is_dataclass(cls) and i == len(parts) - 1:
            raise RecipeError(f"'{key}' is a section, not a key")
    return cls


def parse_value(key: str, raw: str, name: str | None = None) -> Any:
    """A command-line value for recipe key ``key`` (a flag such as ``sample --guidance``), read, type-checked
    and range-checked exactly as ``key=raw`` would be; errors name ``name`` (default: the key)."""
    name = key if name is None else name
    try:
        value = _load_yaml(raw) if raw.strip() != "" else None
    except (yaml.YAMLError, ValueError) as e:
        raise RecipeError(f"{name}: not a valid value ({_yaml_problem(e)})") from None
    value = _coerce(value, key_hint(key), name)
    if key in RANGES:
        RANGES[key].check(name, value)
    return value


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(recipe))


def resolve_recipe(source: str | os.PathLike | dict | None = None, overrides: list[str] = ()) -> Recipe:
    """Resolve a recipe file (or dict) plus ``key=value`` overrides over the defaults, checked whole
    (types, :data:`RANGES`, :func:`validate_recipe`): a RecipeError here, before anything is written."""
    if source is None:
        tree: Any = {}
    elif isinstance(source, dict):
        tree = source
    else:
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"{path}: recipe file not found")
        try:
            tree = _load_yaml(path.read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(f"{path}: cannot be read as text ({type(e).__name__}: {e})") from None
        except (yaml.YAMLError, ValueError) as e:  # ValueError: e.g. an integer past Python's digit limit
            raise RecipeError(f"{path}: not a valid recipe ({_yaml_problem(e)})") from None
        if tree is None:
            tree = {}
        if not isinstance(tree, dict):
            raise RecipeError(f"{path}: a recipe must be a mapping of sections, got a YAML {type(tree).__name__}")
    top = parse_overrides(list(overrides))
    if not isinstance(source, dict):
        tree = _data_owns_resolution(tree, top)
    recipe = _absolute_data_paths(_build(Recipe, _merge(tree, top)))
    validate_recipe(recipe)
    return recipe


def _data_owns_resolution(tree: Any, top: dict[str, Any]) -> Any:
    """A recipe file's ``data.resolution`` belongs to the data that file names: when the overrides name
    other data (``data.name`` or ``data.root``) without a ``data.resolution`` of their own, it is dropped,
    so the new data trains at its own size (a 32×32 colour folder given to the 16×16 digit recipe is not
    silently shrunk). A resolution given on the command line always wins; a dict source (a run's saved
    ``config.yaml``) is taken as it is."""
    data_top = top.get("data")
    data = tree.get("data") if isinstance(tree, dict) else None
    if not isinstance(data_top, dict) or not isinstance(data, dict) or "resolution" in data_top:
        return tree
    other = any(k in data_top and data_top[k] != data.get(k) for k in ("name", "root"))
    if not other or data.get("resolution") is None:
        return tree
    return {**tree, "data": {k: v for k, v in data.items() if k != "resolution"}}


def _absolute_data_paths(recipe: Recipe) -> Recipe:
    """``recipe`` with ``data.root`` and ``data.test_root`` ``~``-expanded and absolute, as the run saves them:
    a run's ``config.yaml`` then names the same files from any directory a later command runs in."""
    d = recipe.data
    data = dataclasses.replace(d, root=absolute_root(d.root), test_root=absolute_root(d.test_root))
    return recipe if data == d else dataclasses.replace(recipe, data=data)


def _value(recipe: Recipe, dotted: str) -> Any:
    node: Any = recipe
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


PRECISIONS = (
    "fp32",
    "bf16",
)  # train.precision: the forward/backward's autocast dtype (privacy.dpsgd.forward_precision)


def _train_sections(r: Recipe) -> list[tuple[str, TrainConfig]]:
    """Every training config of a recipe by its dotted name: ``train`` and the public pretraining stages."""
    return [
        ("train", r.train),
        ("dpdm.pretrain", r.dpdm.pretrain),
        ("ldm.pretrain", r.ldm.pretrain),
        ("dpp.pretrain", r.dpp.pretrain),
        ("dpp.public_pretrain", r.dpp.public_pretrain),
        ("lora.pretrain", r.lora.pretrain),
    ]


def validate_recipe(r: Recipe) -> None:
    """Every numeric key in its range (:data:`RANGES`), then the checks that relate keys to each other
    (and the model shapes that would otherwise fail only when the network is built, mid-start)."""
    for key, bound in RANGES.items():
        bound.check(key, _value(r, key))
    m, ae, lu = r.model, r.ldm.autoencoder, r.ldm.unet
    uses_model = r.method != "dp-ldm"  # DPDM, DPP and LoRA train model.*; DP-LDM its ldm.* networks
    checks = [
        (r.method in METHODS, f"method '{r.method}' is not available (available: {', '.join(METHODS)})"),
        (r.privacy.accountant in ("rdp", "prv"), "privacy.accountant must be 'rdp' or 'prv'"),
        (
            r.privacy.grad_sample_mode in ("bk", "hooks", "functorch"),
            "privacy.grad_sample_mode must be 'bk', 'hooks' or 'functorch'",
        ),
        (
            r.train.max_physical_batch_size >= r.privacy.noise_multiplicity,
            "train.max_physical_batch_size must be >= privacy.noise_multiplicity",
        ),
        (r.train.lr_schedule in ("constant", "cosine"), "train.lr_schedule must be 'constant' or 'cosine'"),
        *(
            (t.precision in PRECISIONS, f"{name}.precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
            for name, t in _train_sections(r)
        ),
        (
            r.train.precision == "fp32" or not r.privacy.enabled or r.privacy.grad_sample_mode == "bk",
            f"train.precision={r.train.precision} needs privacy.grad_sample_mode=bk (Opacus' per-sample "
            "gradients would clip in bfloat16)",
        ),
        (r.diffusion.parameterization in ("edm", "v"), "diffusion.parameterization must be 'edm' or 'v'"),
        (
            r.diffusion.sigma_distribution in ("lognormal", "cosine"),
            "diffusion.sigma_distribution must be 'lognormal' or 'cosine'",
        ),
        (r.diffusion.logsnr_min < r.diffusion.logsnr_max, "diffusion.logsnr_min must be < diffusion.logsnr_max"),
        (r.sampler.name in SAMPLERS, f"sampler.name must be one of {', '.join(SAMPLERS)}"),
        (
            r.sampler.scheduler is None or r.sampler.scheduler in SCHEDULERS,
            f"sampler.scheduler must be null or one of {', '.join(SCHEDULERS)}",
        ),
        (r.sampler.sigma_min < r.sampler.sigma_max, "sampler.sigma_min must be < sampler.sigma_max"),
        (r.sampler.S_min <= r.sampler.S_max, "sampler.S_min must be <= sampler.S_max"),
        (r.evaluate.features in EVALUATE_FEATURES, f"evaluate.features must be one of {', '.join(EVALUATE_FEATURES)}"),
        (
            r.evaluate.max_real is None or r.evaluate.max_real > r.evaluate.pr_k,
            "evaluate.max_real must be > evaluate.pr_k",
        ),
        (r.evaluate.n_samples > r.evaluate.pr_k, "evaluate.n_samples must be > evaluate.pr_k"),
        (
            not uses_model or all(c % m.norm_num_groups == 0 for c in m.channels),
            f"model.channels {list(m.channels)} must all be divisible by model.norm_num_groups={m.norm_num_groups}",
        ),
        (
            not uses_model or all(lvl < len(m.channels) for lvl in m.attention_levels),
            f"model.attention_levels {list(m.attention_levels)} must be in [0, {len(m.channels)}) (model.channels has {len(m.channels)} levels)",
        ),
        (
            not uses_model
            or all(
                m.attention_head_dim <= m.channels[lvl] for lvl in (*m.attention_levels, -1) if lvl < len(m.channels)
            ),
            f"model.attention_head_dim={m.attention_head_dim} must be <= the channels of every attention level and of the last "
            f"(the middle block's): {list(m.channels)}",
        ),
        (
            not uses_model or r.data.resolution is None or r.data.resolution % 2 ** (len(m.channels) - 1) == 0,
            f"data.resolution={r.data.resolution} must be divisible by 2^{len(m.channels) - 1} (model.channels has {len(m.channels)} levels)",
        ),
        (
            uses_model or all(c % ae.norm_num_groups == 0 for c in ae.channels),
            f"ldm.autoencoder.channels {list(ae.channels)} must all be divisible by ldm.autoencoder.norm_num_groups={ae.norm_num_groups}",
        ),
        (
            uses_model or r.data.resolution is None or r.data.resolution % 2 ** (len(ae.channels) - 1) == 0,
            f"data.resolution={r.data.resolution} must be divisible by 2^{len(ae.channels) - 1} (ldm.autoencoder.channels has {len(ae.channels)} levels)",
        ),
        (
            uses_model or all(c % lu.norm_num_groups == 0 for c in lu.channels),
            f"ldm.unet.channels {list(lu.channels)} must all be divisible by ldm.unet.norm_num_groups={lu.norm_num_groups}",
        ),
        (
            uses_model or lu.attention_heads <= min(lu.channels),
            f"ldm.unet.attention_heads={lu.attention_heads} must be <= every ldm.unet.channels {list(lu.channels)}",
        ),
        (
            uses_model or r.ldm.text.encoder != "builtin" or r.ldm.text.width % r.ldm.text.heads == 0,
            f"ldm.text.width={r.ldm.text.width} must be divisible by ldm.text.heads={r.ldm.text.heads}",
        ),
        (len(r.ldm.trainable) >= 1, "ldm.trainable must name at least one group"),
        (r.ldm.net in ("unet", "he"), "ldm.net must be 'unet' or 'he'"),
        (r.method != "dp-ldm" or r.ldm.public_data != r.data.name, "ldm.public_data must not be the private data set"),
        (r.method != "lora" or r.lora.public_data != r.data.name, "lora.public_data must not be the private data set"),
        (r.method != "dpdm" or r.dpdm.public_data != r.data.name, "dpdm.public_data must not be the private data set"),
        (r.method != "dpp" or r.dpp.public_data != r.data.name, "dpp.public_data must not be the private data set"),
        (
            r.lora.objective in ("lora", "privatelora", "stable"),
            "lora.objective must be 'lora', 'privatelora' or 'stable'",
        ),
        (
            r.lora.attacker_feature in PROXY_FEATURES,
            f"lora.attacker_feature must be one of {', '.join(PROXY_FEATURES)}",
        ),
        (len(r.lora.targets) >= 1, "lora.targets must name at least one layer"),
        (
            r.method != "lora" or r.lora.objective == "lora" or not r.privacy.enabled,
            "lora.objective privatelora/stable trains its proxy attacker on members without DP: set privacy.enabled=false",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise RecipeError(message)
    template = r.data.prompt_template
    if template is not None:
        try:
            ok = "{}" in template and template.format("x") == template.replace("{}", "x")
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise RecipeError(
                f"data.prompt_template={template!r}: give one {{}} where the class name goes, e.g. 'a photo of a {{}}'"
            )
    try:  # data.holdout / data.test_root only for data without a test split, and not both
        check_split_options(
            r.data.name, holdout=r.data.holdout, holdout_seed=r.data.holdout_seed, test_root=r.data.test_root
        )
    except ValueError as e:
        raise RecipeError(str(e)) from None
