"""A user's own pretrained diffusers UNet, read from a local directory, as a privdiff ``net``.

Two layouts are read, with diffusers' ``from_pretrained(..., local_files_only=True)`` (nothing is
ever downloaded):

* a pixel-space ``UNet2DModel`` directory (``config.json`` + weights) with its scheduler config
  beside it (``scheduler_config.json`` in the same directory or in ``../scheduler/``), the layout
  of DDPM/ADM checkpoints converted to diffusers;
* the ``unet/`` + ``scheduler/`` components of a Stable-Diffusion-style pipeline directory
  (``model_index.json``).

The net keeps the objective it was trained with (:class:`~privdiff.diffusion.discrete.DiscreteSchedule`
from its scheduler config); :class:`~privdiff.diffusion.discrete.VPDenoiser` makes it a D(x; σ).
What is trainable is chosen by group or by name pattern (:func:`select_trainable`); everything
else is frozen, and the privacy engine clips exactly the trainable parameters.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from pathlib import Path

from diffusers import UNet2DConditionModel, UNet2DModel
from torch import Tensor, nn

from ..atomic import atomic_directory
from ..diffusion.discrete import DiscreteSchedule

__all__ = [
    "DiffusersUNetNet",
    "TRAINABLE_GROUPS",
    "add_lora",
    "export_lora",
    "export_pipeline",
    "export_unet",
    "is_text_pipeline",
    "load_pipeline_vae",
    "pipeline_image_shape",
    "load_text_pipeline",
    "TextUNetNet",
    "load_pretrained_unet",
    "select_trainable",
]


class DiffusersUNetNet(nn.Module):
    """``net(x_t, t, cond)`` over a diffusers UNet: ``cond`` is the text encoder's hidden states
    [B, L, D] for a ``UNet2DConditionModel``, class labels [B] (or None) for a ``UNet2DModel``.

    It carries the net's own training schedule (``schedule``), so that
    :class:`~privdiff.diffusion.discrete.VPDenoiser` makes it a D(x; σ) with the objective it was
    trained with, and it is saved and loaded as a run's checkpoint like privdiff's own nets
    (:meth:`save_pretrained`: the diffusers UNet directory plus ``privdiff_pretrained.json``).
    """

    MARKER = "privdiff_pretrained.json"  # beside the UNet's config.json in a checkpoint: the schedule

    def __init__(
        self,
        unet: UNet2DModel | UNet2DConditionModel,
        schedule: DiscreteSchedule | None = None,
        *,
        unet_dir: str | Path | None = None,
        scheduler_config: dict | None = None,
    ):
        super().__init__()
        self.unet = unet
        self.schedule = schedule or DiscreteSchedule()
        self.unet_dir = None if unet_dir is None else str(unet_dir)  # where the pretrained UNet was read from
        # the pipeline's scheduler config as saved (class, spacing, offsets): what its own schedulers sample with
        self._scheduler_config = None if scheduler_config is None else dict(scheduler_config)
        self.lora: dict | None = None  # rank, alpha, targets of the LoRA adapters (add_lora), if any

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if isinstance(self.unet, UNet2DConditionModel):
            if cond is None:
                raise ValueError("a UNet2DConditionModel needs a condition (the text encoder's hidden states)")
            return self.unet(x, t, encoder_hidden_states=cond).sample
        return self.unet(x, t, class_labels=cond if self.num_classes is not None else None).sample

    @property
    def num_classes(self) -> int | None:
        """The class count of a class-conditional ``UNet2DModel`` (its ``num_class_embeds``), else None."""
        if isinstance(self.unet, UNet2DConditionModel):
            return None
        return self.unet.config.num_class_embeds

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        return (c.in_channels, size, size)

    def conditions(self, *, labels: Tensor | None = None, prompts: list[str] | None = None, n: int) -> Tensor | None:
        """The condition of ``n`` rows: class labels for a class-conditional UNet; none for an unconditional one
        (which reads no labels: an attack's or evaluation's examples may carry them)."""
        if prompts is not None:
            raise ValueError("this pretrained UNet reads no text: a text prompt needs a pipeline's text encoder")
        return None if self.num_classes is None else labels

    def null_condition(self) -> None:
        """None: a pretrained UNet has no null class unless it was trained with one, so no guidance."""
        return None

    @property
    def scheduler_config(self) -> dict:
        """The scheduler config the net came with (``sampler.scheduler`` builds the pipeline's own schedulers from it);
        a DDPM scheduler's on the net's schedule when it came with none."""
        if self._scheduler_config is not None:
            return dict(self._scheduler_config)
        return {"_class_name": "DDPMScheduler", **dataclasses.asdict(self.schedule)}

    def _saved_info(self) -> dict:
        return dataclasses.asdict(self.schedule) | {
            "unet_dir": self.unet_dir,
            "lora": self.lora,
            "scheduler_config": self._scheduler_config,
        }

    def save_pretrained(self, path: str | Path) -> None:
        """A run's checkpoint: the schedule (and where the pretrained parts came from) in ``privdiff_pretrained.json``,
        and the diffusers UNet (``config.json`` + safetensors), or, for a LoRA-adapted one, only its config and the
        adapters (``lora.safetensors``): the frozen base weights are read again from ``unet_dir``."""
        from safetensors.torch import save_file

        path = Path(path)
        if self.lora:
            from peft.utils import get_peft_model_state_dict

            self.unet.save_config(path)
            state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(self.unet).items()}
            save_file(state, str(path / "lora.safetensors"))
        else:
            self.unet.save_pretrained(path, safe_serialization=True)
        (path / self.MARKER).write_text(json.dumps(self._saved_info(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> DiffusersUNetNet:
        """What :meth:`save_pretrained` wrote (a run's checkpoint), offline."""
        from safetensors.torch import load_file

        path = Path(path)
        info = json.loads((path / cls.MARKER).read_text())
        text_from, unet_dir, lora = info.pop("text_from", None), info.pop("unet_dir", None), info.pop("lora", None)
        scheduler_config = info.pop("scheduler_config", None)
        class_prompts = info.pop("class_prompts", None)
        schedule = DiscreteSchedule(**info)
        kind = json.loads((path / "config.json").read_text()).get("_class_name")
        unet_cls = UNet2DConditionModel if kind == "UNet2DConditionModel" else UNet2DModel
        if lora:  # the frozen base from where it came, then the adapters
            if not unet_dir or not Path(unet_dir).is_dir():
                raise ValueError(f"{path}: its LoRA adapters need the pretrained UNet at {unet_dir}, which is gone")
            unet = unet_cls.from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=False)
        else:
            unet = unet_cls.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
        if text_from is None:
            net = DiffusersUNetNet(unet, schedule, unet_dir=unet_dir, scheduler_config=scheduler_config)
        else:
            text_encoder, tokenizer = _text_parts(Path(text_from))  # frozen: read again from the pipeline it came from
            net = TextUNetNet(
                unet,
                schedule,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                base=text_from,
                scheduler_config=scheduler_config,
                class_prompts=class_prompts,
            )
        if lora:
            from peft.utils import set_peft_model_state_dict

            add_lora(net, rank=lora["rank"], alpha=lora["alpha"], target_modules=lora["targets"])
            set_peft_model_state_dict(net.unet, load_file(str(path / "lora.safetensors")))
        return net


class TextUNetNet(DiffusersUNetNet):
    """A Stable-Diffusion-style pipeline's ``UNet2DConditionModel`` with its frozen CLIP text encoder:
    ``net(z_t, t, ids)`` reads token ids [B, L] (a prompt each), encodes them with the text encoder and
    conditions the UNet on its last hidden states, as the pipeline does.

    The text encoder never trains here (its parameters are frozen, so the privacy engine never clips
    them) and is not saved in a checkpoint: :meth:`save_pretrained` writes the UNet and the path of the
    pipeline it came from (``base``), whose ``text_encoder/`` and ``tokenizer/`` :meth:`from_pretrained`
    reads again. The empty prompt is the null condition of classifier-free guidance.

    Fine-tuned on class-labelled data through a prompt template (``data.prompt_template``), it also has
    ``class_prompts`` (one per class, "a photo of a {class name}"): it is then class-conditional, and a class
    label is sampled as its class's prompt (grids, ``sample --label``, evaluate's downstream accuracy).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        schedule: DiscreteSchedule,
        *,
        text_encoder: nn.Module,
        tokenizer,
        base: str | Path,
        scheduler_config: dict | None = None,
        class_prompts: tuple[str, ...] | list[str] | None = None,
    ):
        super().__init__(unet, schedule, unet_dir=Path(base) / "unet", scheduler_config=scheduler_config)
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.base = str(base)
        self.class_prompts = None if class_prompts is None else tuple(class_prompts)

    @property
    def num_classes(self) -> int | None:
        """The classes of its ``class_prompts`` (class-labelled data through a prompt template), else None."""
        return None if self.class_prompts is None else len(self.class_prompts)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            raise ValueError("a text-conditioned UNet needs token ids (the empty prompt is the unconditional one)")
        hidden = self.text_encoder(cond.long())[0]  # [B, L, D]
        return self.unet(x, t, encoder_hidden_states=hidden).sample

    def tokenize(self, prompts: list[str]) -> Tensor:
        """Token ids [n, L] of ``prompts``, padded and truncated to the tokenizer's length (as the pipeline encodes)."""
        max_length = self.tokenizer.model_max_length
        return self.tokenizer(
            list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids

    def conditions(self, *, labels: Tensor | None = None, prompts: list[str] | None = None, n: int) -> Tensor:
        """Token ids of ``n`` rows: one prompt for all, or one each; without a prompt, each label's class prompt
        (a net with ``class_prompts``), else the empty prompt (unconditional)."""
        if prompts is None and labels is not None and self.class_prompts is not None:
            prompts = [self.class_prompts[int(c)] for c in labels]
        prompts = [""] if prompts is None else list(prompts)
        if len(prompts) not in (1, n):
            raise ValueError(f"give one prompt or {n}, got {len(prompts)}")
        ids = self.tokenize(prompts)
        return ids.expand(n, -1) if len(prompts) == 1 else ids

    def null_condition(self) -> Tensor:
        """The empty prompt's token ids [L]: what classifier-free guidance contrasts with."""
        return self.tokenize([""])[0]

    def _saved_info(self) -> dict:
        return super()._saved_info() | {"text_from": self.base, "class_prompts": self.class_prompts}


def _text_parts(root: Path):
    """The frozen CLIP text encoder and the tokenizer of the pipeline at ``root``, checked to belong together."""
    from transformers import AutoTokenizer, CLIPTextModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # privdiff shows its own progress; a component's load is not a long task
    for part in ("text_encoder", "tokenizer"):
        if not (root / part).is_dir():
            raise ValueError(f"{root}: pipeline without a {part}/ component")
    try:
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{root}: the text encoder or tokenizer could not be read ({str(e).splitlines()[0]})"
        ) from None
    if len(tokenizer) > text_encoder.config.vocab_size:
        raise ValueError(
            f"{root}: the tokenizer has {len(tokenizer)} tokens, the text encoder embeds "
            f"{text_encoder.config.vocab_size}: they do not belong together"
        )
    return text_encoder, tokenizer


def load_text_pipeline(path: str | Path) -> TextUNetNet:
    """The UNet, frozen CLIP text encoder and tokenizer of the Stable-Diffusion-style pipeline at ``path``
    (``model_index.json``, ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``vae/``), offline;
    a one-line ValueError for a missing component or a tokenizer the text encoder cannot embed."""
    root = Path(path).expanduser()
    if not (root / "model_index.json").is_file():
        raise ValueError(f"{root}: not a pipeline directory (no model_index.json)")
    if not (root / "vae").is_dir():
        raise ValueError(f"{root}: pipeline without a vae/ component")
    text_encoder, tokenizer = _text_parts(root)
    net, schedule = load_pretrained_unet(root)
    if not isinstance(net.unet, UNet2DConditionModel):
        raise ValueError(f"{root}/unet: a {type(net.unet).__name__}; a text pipeline has a UNet2DConditionModel")
    return TextUNetNet(
        net.unet,
        schedule,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        base=root.resolve(),
        scheduler_config=net.scheduler_config,
    )


def is_text_pipeline(path: str | Path | None) -> bool:
    """Whether ``path`` is a Stable-Diffusion-style text-to-image pipeline directory (it has a text encoder)."""
    return bool(path) and (Path(path) / "model_index.json").is_file() and (Path(path) / "text_encoder").is_dir()


def pipeline_image_shape(path: str | Path) -> tuple[int, int]:
    """(channels, side) of the images the pipeline at ``path`` takes: its VAE's ``in_channels`` and ``sample_size``
    (read from ``vae/config.json``, no weights)."""
    config_file = Path(path).expanduser() / "vae" / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_file}: not a readable VAE config ({e})") from None
    size = config.get("sample_size", 512)
    return int(config.get("in_channels", 3)), int(size if isinstance(size, int) else size[0])


def load_pipeline_vae(path: str | Path):
    """The frozen ``AutoencoderKL`` of the pipeline at ``path`` (its ``vae/``), offline, in eval mode."""
    from diffusers import AutoencoderKL

    root = Path(path).expanduser()
    vae = AutoencoderKL.from_pretrained(root / "vae", local_files_only=True, low_cpu_mem_usage=False)
    return vae.eval().requires_grad_(False)


def _scheduler_config(root: Path) -> dict:
    for path in (
        root / "scheduler_config.json",
        root.parent / "scheduler" / "scheduler_config.json",
        root / "scheduler" / "scheduler_config.json",
    ):
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"{path}: not a readable scheduler config ({e})") from None
    raise ValueError(
        f"{root}: no scheduler_config.json beside the UNet (or in scheduler/): the net's own noise schedule is needed"
    )


def load_pretrained_unet(path: str | Path) -> tuple[DiffusersUNetNet, DiscreteSchedule]:
    """The UNet at ``path`` (a UNet directory or a pipeline directory) and its own training schedule.

    Raises ``ValueError`` with one line for a directory that holds neither, a missing component,
    or a scheduler config whose objective privdiff does not implement.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    if (root / "model_index.json").is_file():  # a pipeline: its unet/ and scheduler/ components
        if not (root / "unet" / "config.json").is_file():
            raise ValueError(f"{root}: pipeline without a unet/ component (unet/config.json)")
        root = root / "unet"
    config_file = root / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{root}: neither a diffusers UNet directory (config.json) nor a pipeline (model_index.json)")
    try:
        kind = json.loads(config_file.read_text()).get("_class_name")
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_file}: not a readable config ({e})") from None
    classes = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
    if kind not in classes:
        raise ValueError(f"{config_file}: a {kind!r}; privdiff reads UNet2DModel or UNet2DConditionModel")
    scheduler_config = _scheduler_config(root)
    schedule = DiscreteSchedule.from_config(scheduler_config)
    try:
        unet = classes[kind].from_pretrained(root, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ValueError(f"{root}: the UNet's weights could not be read ({str(e).splitlines()[0]})") from None
    net = DiffusersUNetNet(unet, schedule, unet_dir=root.resolve(), scheduler_config=scheduler_config)
    return net, schedule


# Module-name patterns of each trainable group (fnmatch over the UNet's parameter names).
TRAINABLE_GROUPS: dict[str, tuple[str, ...]] = {
    "all": ("*",),
    "attentions": (
        "*attentions.*",
    ),  # self- and cross-attention blocks (Transformer2DModel / Attention), DP-LDM's choice
    "cross_attention": ("*attn2.*",),  # the cross-attention layers only
    "norms": ("*norm*",),
    "time_embedding": ("time_embedding.*",),
    "class_embedding": ("class_embedding.*",),
}


def select_trainable(net: nn.Module, trainable: list[str] | tuple[str, ...]) -> list[str]:
    """Freeze every parameter of ``net`` except those of the named groups or patterns; returns the trainable names.

    Each entry is a key of :data:`TRAINABLE_GROUPS` or an fnmatch pattern over parameter names
    (e.g. ``"*attn2.to_k*"``). An entry that matches no parameter is an error, not ignored.
    """
    names = [n for n, _ in net.named_parameters()]
    patterns: list[str] = []
    for entry in trainable:
        group = TRAINABLE_GROUPS.get(entry, (entry,))
        prefixed = [p if p == "*" or p.startswith("*") else f"*{p}" for p in group]
        if not any(fnmatch.fnmatchcase(n, p) for n in names for p in prefixed):
            raise ValueError(f"model.trainable entry {entry!r} matches no parameter of the model")
        patterns += prefixed
    chosen = []
    for name, p in net.named_parameters():
        keep = any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        p.requires_grad_(keep)
        if keep:
            chosen.append(name)
    return chosen


# -- back to plain diffusers ------------------------------------------------------------------------


def add_lora(
    net: DiffusersUNetNet, *, rank: int, alpha: float, target_modules: list[str] | tuple[str, ...]
) -> list[str]:
    """Freeze the UNet and add LoRA adapters (peft, through diffusers' ``add_adapter``) on ``target_modules``.

    The adapters' B factors start at zero (the base model's output is unchanged); only they train.
    Returns the trainable parameter names.
    """
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    net.unet.requires_grad_(False)
    net.lora = {"rank": rank, "alpha": alpha, "targets": list(target_modules)}
    try:
        net.unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=True)
        )
    except ValueError as e:
        raise ValueError(f"LoRA target modules {list(target_modules)}: {str(e).splitlines()[0]}") from None
    return [n for n, p in net.named_parameters() if p.requires_grad]


def plain_unet(net: DiffusersUNetNet) -> UNet2DModel | UNet2DConditionModel:
    """A copy of ``net``'s UNet as plain diffusers: LoRA adapters, if any, merged into the weights
    (W ← W + (α/r)·BA in every adapted layer) and the plain layers put back."""
    import copy

    unet = copy.deepcopy(net.unet)
    if getattr(unet, "peft_config", None):
        from diffusers.utils import recurse_remove_peft_layers
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in unet.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        recurse_remove_peft_layers(unet)
        del unet.peft_config
        unet._hf_peft_config_loaded = False
    return unet


def export_pipeline(net: DiffusersUNetNet, *, base: str | Path, out: str | Path) -> Path:
    """Write a diffusers pipeline directory: the pipeline at ``base`` with its UNet replaced by ``net``'s.

    ``DiffusionPipeline.from_pretrained(out)`` loads and runs it. LoRA adapters, if any, are merged
    into the exported UNet's weights. Written to a temporary sibling and renamed, so ``out`` is
    either complete or absent; an existing ``out`` is never overwritten.
    """
    import shutil

    base, out = Path(base).expanduser(), Path(out).expanduser()
    if not (base / "model_index.json").is_file():
        raise ValueError(f"{base}: not a diffusers pipeline directory (no model_index.json)")
    if out.exists():
        raise ValueError(f"{out}: already exists; choose a new directory")
    with atomic_directory(out) as tmp:
        shutil.copytree(base, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("unet"))
        plain_unet(net).save_pretrained(tmp / "unet", safe_serialization=True)
    return out


def export_unet(net: DiffusersUNetNet, *, base: str | Path, out: str | Path) -> Path:
    """Write a diffusers UNet directory: ``net``'s UNet (``UNet2DModel.from_pretrained(out)``) with the scheduler
    config of the UNet at ``base`` beside it (the layout :func:`load_pretrained_unet` reads), so the fine-tuned
    net is sampled with the schedule it was trained with. ``out`` is written complete or not at all, never over
    an existing directory."""
    base, out = Path(base).expanduser(), Path(out).expanduser()
    if out.exists():
        raise ValueError(f"{out}: already exists; choose a new directory")
    config = _scheduler_config(base / "unet" if (base / "model_index.json").is_file() else base)
    with atomic_directory(out) as tmp:
        plain_unet(net).save_pretrained(tmp, safe_serialization=True)
        (tmp / "scheduler_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def export_lora(net: DiffusersUNetNet, *, out: str | Path) -> Path:
    """Write ``net``'s LoRA adapters in the diffusers LoRA format (``pytorch_lora_weights.safetensors``),
    which ``pipe.load_lora_weights(out)`` accepts on a copy of the base pipeline."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if not getattr(net.unet, "peft_config", None):
        raise ValueError("the model has no LoRA adapters to export")
    out = Path(out).expanduser()
    if out.exists():
        raise ValueError(f"{out}: already exists; choose a new directory")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(net.unet))
    # the adapter's config (rank, alpha, targets) travels with the weights: without it diffusers loads the
    # adapters at scale 1 instead of alpha/rank
    metadata = net.unet.peft_config["default"].to_dict()
    with atomic_directory(out) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=layers, safe_serialization=True, unet_lora_adapter_metadata=metadata
        )
    return out
