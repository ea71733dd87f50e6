"""A user's pretrained diffusers model as the methods use it: the net checked against the private data, the
public prior the ledger names, captioned private images as the pipeline's latents and caption conditions,
and what trains (groups, patterns or LoRA adapters). Shared by ``dp-finetune`` and ``lora`` on a pipeline."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from ..config import Recipe
from ..data import ImageDataset
from ..models.pretrained import (
    DiffusersUNetNet,
    TextUNetNet,
    add_lora,
    load_pipeline_vae,
    load_pretrained_unet,
    pipeline_image_shape,
    select_trainable,
)
from .stages import captioned_dataset

__all__ = [
    "absolute_pretrained",
    "caption_condition",
    "only_lora_trains",
    "captioned_latents",
    "pipeline_encoder",
    "pretrained_net",
    "trainable_chooser",
    "weights_identity",
]


def absolute_pretrained(recipe: Recipe) -> Recipe:
    """``recipe`` with ``model.pretrained`` ``~``-expanded and absolute, as the run saves it (checkpoints of LoRA
    runs and exports read the base from there again, whatever the directory a later command runs in)."""
    path = recipe.model.pretrained
    if not path:
        return recipe
    return dataclasses.replace(
        recipe, model=dataclasses.replace(recipe.model, pretrained=str(Path(path).expanduser().resolve()))
    )


def only_lora_trains(net: torch.nn.Module) -> None:
    """Freeze every parameter of ``net`` but its LoRA adapters' A and B factors."""
    for name, p in net.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)


def pretrained_net(recipe: Recipe, *, like: ImageDataset) -> DiffusersUNetNet:
    """The UNet at ``model.pretrained``, checked against the private data ``like`` (channels, size, classes)."""
    path = recipe.model.pretrained
    if not path:
        raise ValueError("model.pretrained is not set: give the directory of a diffusers UNet2DModel or pipeline")
    net, _ = load_pretrained_unet(path)
    C, H, _ = net.sample_shape
    if (C, H) != (like.channels, like.resolution):
        raise ValueError(
            f"model.pretrained={path} takes {C}-channel {H}x{H} images; {like.name} has {like.channels}-channel "
            f"{like.resolution}x{like.resolution} (set data.resolution={H}, or use data of that many channels)"
        )
    if net.num_classes is not None and like.num_classes > net.num_classes:
        raise ValueError(f"model.pretrained={path} knows {net.num_classes} classes; {like.name} has {like.num_classes}")
    return net


def weights_identity(path: str | Path) -> dict:
    """The public prior as the ledger names it: the directory and a SHA-256 of its weight and config files."""
    root = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"))
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(p.read_bytes())
    return {
        "name": f"pretrained:{root.name}",
        "split": "weights",
        "fingerprint": "sha256:" + h.hexdigest(),
        "size": len(files),
    }


def captioned_latents(recipe: Recipe, net: TextUNetNet, *, split: str = "train") -> tuple[ImageDataset, torch.Tensor]:
    """The private captioned images (``data.root``: metadata.jsonl or caption files) as the pipeline's latents, and
    their captions as token ids [N, L] (``split``: the part of ``data.holdout``'s split).

    Latents are encoded ONCE with the frozen VAE: z = s·μ(x) (the posterior mean, scaled by the VAE's
    scaling factor), a fixed preprocessing of each private example; DP-SGD then runs on (z, caption)
    pairs exactly as on images. The data identity (and the budget registry's key) is the fingerprint
    of the images *and* their captions: both are private.

    Class-labelled data with ``data.prompt_template`` is captioned by the template and its class names;
    the net then keeps one prompt per class (``class_prompts``) and is sampled by class like any other."""
    data = captioned_dataset(recipe, split=split)  # "train": never the held-out part (data.holdout)
    template = recipe.data.prompt_template
    if template is not None:
        names = data.class_names or tuple(str(c) for c in range(data.num_classes))
        net.class_prompts = tuple(template.format(name) for name in names)
    encode = pipeline_encoder(recipe.model.pretrained)
    z = torch.cat([encode(data.images[i : i + 64]) for i in range(0, len(data), 64)])
    if tuple(z.shape[1:]) != net.sample_shape:
        raise ValueError(
            f"data.resolution={data.resolution} gives {tuple(z.shape[1:])} latents; the UNet of model.pretrained takes "
            f"{net.sample_shape} (set data.resolution to the VAE's sample_size, "
            f"{pipeline_image_shape(recipe.model.pretrained)[1]})"
        )
    # the same data set (name, split, fingerprint: what the ledger describes), as latents
    return dataclasses.replace(data, images=z), net.tokenize(list(data.captions))


def pipeline_encoder(path: str | Path, *, device: torch.device | None = None):
    """Images in [-1, 1] → the latents the pipeline at ``path`` trains on: z = s·μ(x), its frozen VAE's posterior
    mean scaled by its ``scaling_factor`` (training, and the attacks that must query the net where it trained)."""
    vae = load_pipeline_vae(path)
    if device is not None:
        vae = vae.to(device)

    @torch.no_grad()
    def encode(x: torch.Tensor) -> torch.Tensor:
        z = vae.encode(x.to(next(vae.parameters()).device)).latent_dist.mean
        return (z * vae.config.scaling_factor).float()

    return encode


def caption_condition(ids: torch.Tensor, null: torch.Tensor, *, p: float, device: torch.device):
    """The training condition of captioned examples: per draw, the example's caption ids [N, L] (row ``idx``),
    replaced by the empty prompt's ``null`` with probability p (classifier-free guidance)."""
    ids, null = ids.to(device), null.to(device)

    def condition(idx: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
        rows = ids[idx.to(device, non_blocking=True)][:, None].expand(-1, K, -1)  # [B, K, L]
        drop = torch.rand(rows.shape[:2], generator=generator, device=device) < p
        return torch.where(drop[..., None], null, rows)

    return condition


def trainable_chooser(recipe: Recipe, unet_of):
    """What trains, as a ``select(net)`` for the stage: ``model.trainable`` groups or patterns of the UNet
    (:func:`~privdiff.models.pretrained.select_trainable`), or ``[lora]``: LoRA adapters (peft) of rank
    ``model.lora_rank`` and scale ``model.lora_alpha``/rank on ``model.lora_targets``, added to a fresh net
    (a resumed one has them), with every other weight frozen."""
    m = recipe.model
    if "lora" not in m.trainable:
        return lambda net: select_trainable(unet_of(net), m.trainable)
    if len(m.trainable) != 1:
        raise ValueError(f"model.trainable={list(m.trainable)}: [lora] trains the adapters alone; give it on its own")

    def select(net) -> None:
        if not net.lora:
            add_lora(net, rank=m.lora_rank, alpha=m.lora_alpha, target_modules=m.lora_targets)
        only_lora_trains(net)

    return select
