"""DP fine-tuning of a user's own pretrained diffusers UNet (PDP-Diffusion / DPImageBench's
"public pretraining, then DP-SGD"; DPDM's recipe on a pretrained net).

``model.pretrained`` is a local ``UNet2DModel`` directory (with its scheduler config) or a pipeline
directory; nothing is downloaded. The net keeps the objective it was trained with: DDPM
ε- or v-prediction on its own β schedule, written as a D(x; σ)
(:class:`~privdiff.diffusion.discrete.VPDenoiser`) with σ = σ_t, t ~ U{0, …, T−1}
(:class:`~privdiff.diffusion.discrete.DiscreteSigma`), so privdiff's loss with noise multiplicity K
is exactly its DDPM loss averaged over K draws. ``model.trainable`` chooses what trains (all, groups
such as ``attentions`` or ``norms``, or name patterns); everything else is frozen and never clipped.

One private stage, ``dp_sgd``: Poisson sampling, per-example clipping of the trainable
parameters, Gaussian noise calibrated to (ε, δ), the ledger and the registry as for every method.
The pretrained weights are public by assumption (the user's claim: they were not trained on the
private data); the ledger names them as the run's public prior.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from ..config import Recipe
from ..core.denoisers import default_device, load_decoder
from ..core.generation import generate, sample_class_grid
from ..core.stages import MethodResult, captioned_dataset, private_dataset
from ..core.training import Stage, check_stage, train_denoiser
from ..data import ImageDataset
from ..diffusion.discrete import DiscreteSigma
from ..models.pretrained import (
    DiffusersUNetNet,
    TextUNetNet,
    add_lora,
    is_text_pipeline,
    load_pipeline_vae,
    load_pretrained_unet,
    load_text_pipeline,
    select_trainable,
)
from ..privacy.audit import GradientCanaries
from ..privacy.budget import check_plan, open_ledger
from ..runs import open_run, save_samples

__all__ = ["pretrained_net", "train"]


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


def _no_condition(idx: torch.Tensor, K: int, generator: torch.Generator) -> None:
    return None


def _labels(dataset: ImageDataset, device: torch.device):
    labels = dataset.labels.to(device)

    def condition(idx: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
        return labels[idx.to(device)][:, None].expand(
            -1, K
        )  # no null class to drop to: the net was not trained with one

    return condition


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


def captioned_latents(recipe: Recipe, net: TextUNetNet) -> tuple[ImageDataset, torch.Tensor]:
    """The private captioned images (``data.root``: metadata.jsonl or caption files) as the pipeline's latents, and
    their captions as token ids [N, L].

    Latents are encoded ONCE with the frozen VAE: z = s·μ(x) (the posterior mean, scaled by the VAE's
    scaling factor), a fixed preprocessing of each private example; DP-SGD then runs on (z, caption)
    pairs exactly as on images. The data identity (and the budget registry's key) is the fingerprint
    of the images *and* their captions: both are private.

    Class-labelled data with ``data.prompt_template`` is captioned by the template and its class names;
    the net then keeps one prompt per class (``class_prompts``) and is sampled by class like any other."""
    data, captions = captioned_dataset(recipe, split="train")  # never the held-out part (data.holdout)
    template = recipe.data.prompt_template
    if template is not None:
        names = data.class_names or tuple(str(c) for c in range(data.num_classes))
        net.class_prompts = tuple(template.format(name) for name in names)
    vae = load_pipeline_vae(recipe.model.pretrained)
    with torch.no_grad():
        z = torch.cat([vae.encode(data.images[i : i + 64]).latent_dist.mean for i in range(0, len(data), 64)])
    z = (z * vae.config.scaling_factor).float()
    if tuple(z.shape[1:]) != net.sample_shape:
        raise ValueError(
            f"data.resolution={data.resolution} gives {tuple(z.shape[1:])} latents; the UNet of model.pretrained takes "
            f"{net.sample_shape} (set data.resolution to the VAE's sample_size, {vae.config.sample_size})"
        )
    # the same data set (name, split, fingerprint: what the ledger describes), as latents
    return dataclasses.replace(data, images=z), net.tokenize(captions)


def _captions(ids: torch.Tensor, null: torch.Tensor, *, p: float, device: torch.device):
    """Per draw: the example's caption ids, replaced by the empty prompt's with probability p (classifier-free guidance)."""
    ids, null = ids.to(device), null.to(device)

    def condition(idx: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
        rows = ids[idx.to(device)][:, None].expand(-1, K, -1)  # [B, K, L]
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
        for name, p in net.named_parameters():
            p.requires_grad_(".lora_A." in name or ".lora_B." in name)

    return select


def train(
    recipe: Recipe,
    *,
    out: str | Path,
    progress: bool = True,
    grid_per_class: int = 10,
    audit: GradientCanaries | None = None,
) -> MethodResult:
    """DP-SGD fine-tuning of ``model.pretrained`` on the recipe's private data into run ``out``; then a grid
    (one row per class for a class-conditional UNet or a text pipeline on ``data.prompt_template``'s class prompts,
    else ``grid_per_class`` rows of 10 unconditional samples: a text pipeline's grid on captioned images uses the
    empty prompt, never a private caption)."""
    pretrained = str(Path(recipe.model.pretrained).expanduser().resolve()) if recipe.model.pretrained else None
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, pretrained=pretrained))  # absolute
    device = default_device()
    # everything that can fail is checked before the run writes anything or reserves budget
    if is_text_pipeline(
        pretrained
    ):  # latents of the frozen VAE, conditioned on the captions by the frozen text encoder
        net = load_text_pipeline(pretrained)
        dataset, ids = captioned_latents(recipe, net)
        condition = _captions(ids, net.null_condition(), p=recipe.diffusion.label_dropout, device=device)
        unet_of = lambda m: m.unet  # noqa: E731  the text encoder never trains
    else:
        dataset = private_dataset(recipe)
        net = pretrained_net(recipe, like=dataset)
        condition = _no_condition if net.num_classes is None else _labels(dataset, device)
        unet_of = lambda m: m  # noqa: E731
    choose = trainable_chooser(recipe, unet_of)
    choose(net)  # a group or pattern that matches nothing, or LoRA targets that match no module, is an error now
    check_stage(stage="dp_sgd", num_examples=len(dataset), train=recipe.train)
    check_plan(out, recipe, dataset)
    prior = weights_identity(Path(pretrained))
    run = open_run(out, recipe, class_names=dataset.class_names if net.num_classes is not None else None)
    with run.starting():  # a start that still fails removes what it created
        ledger = open_ledger(run, recipe, dataset)
        ledger.record_public(stage="pretrained", data=prior, steps=0)
        ledger.save(run.ledger_path)
        stage = Stage(
            name="dp_sgd",
            init=lambda: net,
            select=choose,
            condition=condition,
            sigmas=DiscreteSigma(net.schedule),
        )
        result = train_denoiser(
            run=run, recipe=recipe, dataset=dataset, ledger=ledger, stage=stage, audit=audit, progress=progress
        )
    grid = None  # train --no-grid: grid_per_class = 0
    if net.num_classes is not None:
        grid = sample_class_grid(
            run,
            recipe,
            result.denoiser,
            num_classes=net.num_classes,
            per_class=grid_per_class,
            decode=load_decoder(run),
            progress=progress,
        )
    elif grid_per_class:  # an unconditional UNet, or the empty prompt: grid_per_class rows of 10
        images = generate(
            result.denoiser,
            labels=None,
            n=10 * grid_per_class,
            recipe=recipe,
            decode=load_decoder(run),
            seed=recipe.train.seed,
            progress=progress,
        )
        grid, _ = save_samples(run.samples, images, None, nrow=10)
    return MethodResult(run=run, grid=grid, ledger=ledger, steps=result.steps)
