"""DP-LDM (Liu, Lyu, Vinaroz & Park, TMLR 2024): latent diffusion pretrained on public data,
then DP-SGD on a small part of it.

Stages, all on the shared core:

1. ``autoencoder`` (public): a KL autoencoder maps 28×28 images to 4×7×7 latents.
2. ``pretrain`` (public): a cross-attention latent UNet, its class embedder and privdiff's text
   encoder learn to denoise public latents conditioned on labels and captions — the one
   training loop (:func:`~privdiff.core.training.train_denoiser`), without a ledger.
3. ``dp_sgd`` (private): the same loop with DP-SGD on the private latents, training only
   ``ldm.trainable`` (default: the UNet's attention/cross-attention blocks and the class
   embedder, as DP-LDM's ``train_condition_only``); every other parameter is frozen, so
   per-example gradients exist only for the trainable ones.

The ledger composes the private stage only; it names the public data of stages 1–2.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from ..config import Recipe
from ..core.denoisers import default_device, load_decoder
from ..core.generation import sample_class_grid
from ..core.stages import MethodResult, pretrain, private_dataset, public_data, train_autoencoder
from ..core.training import Conditioner, Stage, check_stage, train_denoiser
from ..data import ImageDataset
from ..data.captions import caption_variants
from ..diffusion import drop_labels
from ..models.autoencoder import build_autoencoder, encode_latents
from ..models.latent import build_latent_net, select_trainable
from ..models.text import build_text_encoder
from ..privacy.audit import GradientCanaries
from ..privacy.budget import check_plan, open_ledger
from ..runs import open_run


def load_public(recipe: Recipe, *, like: ImageDataset) -> ImageDataset:
    """DP-LDM's public data: ``ldm.public_*`` framed like the private set ``like`` (:func:`~privdiff.core.stages.public_data`)."""
    return public_data(recipe, like=like, section="ldm")


def latent_net(
    recipe: Recipe, text_encoder: torch.nn.Module, *, latent_channels: int, latent_size: int, num_classes: int
):
    """A fresh latent denoiser (``ldm.net``: the cross-attention UNet, or the HE-friendly network of encrypted
    inference) around a copy of ``text_encoder``."""
    L = recipe.ldm
    if L.net == "he":  # the HE-friendly denoiser of encrypted inference (privdiff.models.he_net)
        from ..models.he_net import build_he_net

        return build_he_net(
            L.he,
            copy.deepcopy(text_encoder),
            latent_channels=latent_channels,
            latent_size=latent_size,
            num_classes=num_classes,
        )
    return build_latent_net(
        L.unet,
        copy.deepcopy(text_encoder),
        latent_channels=latent_channels,
        latent_size=latent_size,
        num_classes=num_classes,
    )


def caption_conditioner(dataset: ImageDataset, recipe: Recipe, tokenizer, device: torch.device) -> Conditioner:
    """Per draw: [label or ∅, tokens of a random caption of that label or none], each dropped independently
    (``diffusion.label_dropout``, ``ldm.text.caption_dropout``), so the model learns label-only, text-only,
    joint and unconditional denoising (classifier-free guidance on either)."""
    names = dataset.class_names or tuple(str(i) for i in range(dataset.num_classes))
    variants = [caption_variants(n) for n in names]
    V = min(len(v) for v in variants)
    table = torch.stack([tokenizer.encode(v[:V]) for v in variants]).to(device)  # [classes, variants, L]
    labels, p_text, no_text = (
        dataset.labels.to(device),
        recipe.ldm.text.caption_dropout,
        tokenizer.null_ids().to(device),
    )

    def condition(idx: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
        y = labels[idx.to(device, non_blocking=True)][:, None].expand(-1, K)  # [B, K]
        # caption variant v_bk ~ U{variants}, text dropped with p
        v = torch.randint(0, V, y.shape, generator=generator, device=device)
        keep = torch.rand(y.shape, generator=generator, device=device) >= p_text
        tokens = torch.where(keep[..., None], table[y, v], no_text)
        y = drop_labels(y, p=recipe.diffusion.label_dropout, null_label=dataset.num_classes, generator=generator)
        return torch.cat([y[..., None], tokens], dim=-1)  # [B, K, 1 + L]

    return condition


def train(
    recipe: Recipe,
    *,
    out: str | Path,
    progress: bool = True,
    grid_per_class: int = 10,
    audit: GradientCanaries | None = None,
) -> MethodResult:
    """Run DP-LDM's three stages into run directory ``out`` (resuming any that is done) and sample a class grid.

    ``audit``: the canaries of ``privdiff audit`` (:mod:`privdiff.evaluation.audit`), put into the DP-SGD stage only."""
    L, device = recipe.ldm, default_device()
    private = private_dataset(recipe)
    public = load_public(recipe, like=private)
    names = private.class_names or tuple(str(i) for i in range(private.num_classes))

    def text():
        return build_text_encoder(L.text, class_names=(names, public.class_names or names))

    # everything that can fail is checked before the run writes anything or reserves budget: the
    # networks of every stage (built on the meta device; the text encoder for real, as a local
    # Hugging Face one may be missing), the batch sizes, the trainable groups, the noise calibration
    with torch.random.fork_rng(devices=[]):
        text_encoder = text()
        with torch.device("meta"):
            build_autoencoder(L.autoencoder, in_channels=public.channels, resolution=public.resolution)
    latent = dict(
        latent_channels=L.autoencoder.latent_channels,
        num_classes=private.num_classes,
        latent_size=private.resolution // 2 ** (len(L.autoencoder.channels) - 1),
    )
    check_stage(
        stage="pretrain",
        num_examples=len(public),
        train=L.pretrain,
        build=lambda: latent_net(recipe, text_encoder, **latent),
    )
    check_stage(
        stage="dp_sgd",
        num_examples=len(private),
        train=recipe.train,
        build=lambda: latent_net(recipe, text_encoder, **latent),
        select=lambda net: select_trainable(net, L.trainable),
    )
    check_plan(out, recipe, private)
    run = open_run(out, recipe, class_names=private.class_names)
    with run.starting():  # a start that still fails removes what it created
        ledger = open_ledger(run, recipe, private)
        ae = train_autoencoder(run=run, recipe=recipe, public=public, ledger=ledger, progress=progress)
    z_public = dataclasses.replace(public, images=encode_latents(ae, public.images.to(device)).cpu())
    z_private = dataclasses.replace(private, images=encode_latents(ae, private.images.to(device)).cpu())
    text_encoder = text()  # drawn here, after the autoencoder, as always (same weights for the same seed)
    tokenizer = text_encoder.tokenizer

    def fresh():
        return latent_net(
            recipe,
            text_encoder,
            latent_channels=z_private.channels,
            latent_size=z_private.resolution,
            num_classes=private.num_classes,
        )

    pre = pretrain(
        run,
        recipe,
        z_public,
        train=L.pretrain,
        ledger=ledger,
        init=fresh,
        condition=caption_conditioner(z_public, recipe, tokenizer, device),
        cache_extra={  # what the caption conditioner draws from, beside the data and the network
            "condition": "labels and caption variants",
            "caption_dropout": L.text.caption_dropout,
            "class_names": list(z_public.class_names or ()),
        },
        progress=progress,
    )

    def pretrained():
        return copy.deepcopy(pre.denoiser.net).requires_grad_(True)

    stage = Stage(
        name="dp_sgd",
        init=pretrained,
        select=lambda net: select_trainable(net, L.trainable),
        condition=caption_conditioner(z_private, recipe, tokenizer, device),
    )
    result = train_denoiser(
        run=run, recipe=recipe, dataset=z_private, ledger=ledger, stage=stage, audit=audit, progress=progress
    )
    grid = sample_class_grid(
        run,
        recipe,
        result.denoiser,
        num_classes=private.num_classes,
        per_class=grid_per_class,
        decode=load_decoder(run),
        progress=progress,
    )
    return MethodResult(run=run, grid=grid, ledger=ledger, steps=result.steps)
