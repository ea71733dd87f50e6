"""Recipes: nested dataclasses are the single source of truth for every key and its default.

A recipe YAML and ``key=value`` overrides (dotted paths, as DPDM's OmegaConf command line) are
merged over the defaults; an unknown key or a value of the wrong type is an error, never ignored.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .models.autoencoder import AutoencoderConfig
from .models.he_net import HENetConfig
from .models.latent import LatentUNetConfig
from .models.text import TextConfig
from .models.unet import UNetConfig


METHODS = ("dpdm", "dp-ldm", "dpp", "lora")
PROXY_FEATURES = ("map", "loss")  # what the proxy attacker h_ω reads (privdiff.attacks.proxy.proxy_features)


class RecipeError(ValueError):
    """A recipe or override that cannot be resolved (unknown key, wrong type, bad value)."""


@dataclass(frozen=True)
class DataConfig:
    name: str = "mnist5k"  # mnist5k | digits | mnist | fashion-mnist | cifar10 | folder
    root: str | None = None  # where the files of mnist/fashion-mnist/cifar10/folder are
    resolution: int | None = None  # resize to this (square); None keeps the native size


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
    checkpoint_every: int = 50  # steps
    seed: int = 0


@dataclass(frozen=True)
class SamplerConfig:
    name: str = "heun"  # heun/edm (EDM Algorithm 2) | euler/ddim
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
    features: str = "public"  # public: feature CNN trained on public_data | train: on the real training split (recorded as such)
    public_data: str = "digits"  # the public data set of the feature CNN (features=public)
    public_root: str | None = None
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
    public_margin: int = 4  # public images are drawn this many pixels inside a background frame (MNIST's layout)
    public_contrast: float = 0.0  # g of x <- tanh(g x)/tanh(g) on the public images (0: unchanged)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: LatentUNetConfig = field(default_factory=LatentUNetConfig)
    text: TextConfig = field(default_factory=TextConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    trainable: tuple[str, ...] = ("attentions", "class_embedder")  # privately fine-tuned (privdiff.models.latent.TRAINABLE_GROUPS or name patterns)
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
    pretrain: PretrainConfig = field(default_factory=lambda: PretrainConfig(batch_size=128, epochs=20.0, lr=2e-3, ema_decay=0.995))


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA fine-tuning (``method: lora``) of a UNet pretrained on public data, toward a small private
    member set, plain or defended against membership inference (PrivateLoRA, Luo et al. AAAI 2025)."""

    public_data: str = "digits"  # public data set of the pretraining (never the private one)
    public_root: str | None = None
    public_margin: int = 4  # as ldm.public_margin: public digits drawn inside a background frame
    public_contrast: float = 2.5  # as ldm.public_contrast
    pretrain: PretrainConfig = field(default_factory=lambda: PretrainConfig(batch_size=128, epochs=40.0, lr=2e-3, ema_decay=0.995))
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
    attacker_feature: str = "map"  # map (the paper's squared-error map at sigma ~ p_train) | loss (log mean error at a Goldilocks t)


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
    ldm: LDMConfig = field(default_factory=LDMConfig)
    dpp: DPPConfig = field(default_factory=DPPConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert one YAML value against a dataclass field's type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is tuple:
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
            return float(value)
        if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", ".inf"):
            return float("inf")
    elif hint is str:
        if isinstance(value, str):
            return value
    raise RecipeError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in known:
            raise RecipeError(f"unknown recipe key '{path}' (known under '{prefix or '.'}': {', '.join(known)})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise RecipeError(f"{path}: expected a section (mapping), got {value!r}")
            kwargs[key] = _build(hint, value, prefix=f"{path}.")
        else:
            kwargs[key] = _coerce(value, hint, path)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["privacy.epsilon=1", "train.batch_size=512"]`` -> nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise RecipeError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        if not key:
            raise RecipeError(f"override '{item}' has an empty key")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else None)
    return tree


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


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
    """Resolve a recipe file (or dict) plus ``key=value`` overrides over the defaults."""
    if source is None:
        tree: dict[str, Any] = {}
    elif isinstance(source, dict):
        tree = source
    else:
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"{path}: recipe file not found")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise RecipeError(f"{path}: a recipe must be a mapping of sections")
    recipe = _build(Recipe, _merge(tree, parse_overrides(list(overrides))))
    validate_recipe(recipe)
    return recipe


def validate_recipe(r: Recipe) -> None:
    """Range checks that a type check cannot express."""
    checks = [
        (r.privacy.epsilon > 0, "privacy.epsilon must be > 0"),
        (0 < r.privacy.delta < 1, "privacy.delta must be in (0, 1)"),
        (r.privacy.max_grad_norm > 0, "privacy.max_grad_norm must be > 0"),
        (r.privacy.noise_multiplicity >= 1, "privacy.noise_multiplicity must be >= 1"),
        (r.privacy.accountant in ("rdp", "prv"), "privacy.accountant must be 'rdp' or 'prv'"),
        (r.privacy.grad_sample_mode in ("bk", "hooks", "functorch"), "privacy.grad_sample_mode must be 'bk', 'hooks' or 'functorch'"),
        (r.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (r.train.epochs > 0, "train.epochs must be > 0"),
        (r.train.max_steps is None or r.train.max_steps >= 1, "train.max_steps must be >= 1"),
        (r.train.max_physical_batch_size >= r.privacy.noise_multiplicity,
         "train.max_physical_batch_size must be >= privacy.noise_multiplicity"),
        (0 <= r.train.ema_decay < 1, "train.ema_decay must be in [0, 1)"),
        (r.train.lr_schedule in ("constant", "cosine"), "train.lr_schedule must be 'constant' or 'cosine'"),
        (r.diffusion.parameterization in ("edm", "v"), "diffusion.parameterization must be 'edm' or 'v'"),
        (r.diffusion.sigma_distribution in ("lognormal", "cosine"), "diffusion.sigma_distribution must be 'lognormal' or 'cosine'"),
        (0 <= r.diffusion.label_dropout < 1, "diffusion.label_dropout must be in [0, 1)"),
        (r.sampler.steps >= 1, "sampler.steps must be >= 1"),
        (r.evaluate.n_samples >= 2, "evaluate.n_samples must be >= 2"),
        (r.evaluate.features in ("public", "train"), "evaluate.features must be 'public' or 'train'"),
        (0 < r.evaluate.holdout < 1, "evaluate.holdout must be in (0, 1)"),
        (r.evaluate.classifier_epochs >= 1, "evaluate.classifier_epochs must be >= 1"),
        (r.evaluate.pr_k >= 1, "evaluate.pr_k must be >= 1"),
        (r.evaluate.max_real is None or r.evaluate.max_real > r.evaluate.pr_k, "evaluate.max_real must be > evaluate.pr_k"),
        (r.method in METHODS, f"method '{r.method}' is not available (available: {', '.join(METHODS)})"),
        (0 <= r.ldm.text.caption_dropout < 1, "ldm.text.caption_dropout must be in [0, 1)"),
        (r.ldm.public_contrast >= 0, "ldm.public_contrast must be >= 0"),
        (r.lora.public_contrast >= 0, "lora.public_contrast must be >= 0"),
        (r.dpp.noise_multiplier > 0, "dpp.noise_multiplier must be > 0"),
        (r.dpp.rounds >= 1 and r.dpp.copies >= 1 and r.dpp.downsample >= 1, "dpp.rounds, dpp.copies and dpp.downsample must be >= 1"),
        (1 <= r.dpp.magnitude <= 10 and r.dpp.num_ops >= 0, "dpp.magnitude must be in 1..10, dpp.num_ops >= 0"),
        (len(r.ldm.trainable) >= 1, "ldm.trainable must name at least one group"),
        (r.ldm.net in ("unet", "he"), "ldm.net must be 'unet' or 'he'"),
        (r.method != "dp-ldm" or r.ldm.public_data != r.data.name, "ldm.public_data must not be the private data set"),
        (r.method != "lora" or r.lora.public_data != r.data.name, "lora.public_data must not be the private data set"),
        (r.lora.objective in ("lora", "privatelora", "stable"), "lora.objective must be 'lora', 'privatelora' or 'stable'"),
        (r.lora.rank >= 1 and r.lora.alpha > 0, "lora.rank must be >= 1 and lora.alpha > 0"),
        (r.lora.attacker_feature in PROXY_FEATURES, f"lora.attacker_feature must be one of {', '.join(PROXY_FEATURES)}"),
        (r.lora.n_per_role >= 1 and r.lora.attacker_batch >= 1 and r.lora.attacker_steps >= 0,
         "lora.n_per_role and lora.attacker_batch must be >= 1, lora.attacker_steps >= 0"),
        (r.lora.lam >= 0 and r.lora.stabilizer > 0, "lora.lam must be >= 0 and lora.stabilizer > 0"),
        (r.method != "lora" or r.lora.objective == "lora" or not r.privacy.enabled,
         "lora.objective privatelora/stable trains its proxy attacker on members without DP: set privacy.enabled=false"),
    ]
    for ok, message in checks:
        if not ok:
            raise RecipeError(message)
