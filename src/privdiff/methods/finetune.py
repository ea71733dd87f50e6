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
from ..core.denoisers import default_device
from ..core.generation import generate, sample_class_grid
from ..core.stages import MethodResult, private_dataset
from ..core.training import Stage, check_stage, train_denoiser
from ..data import ImageDataset
from ..diffusion.discrete import DiscreteSigma
from ..models.pretrained import DiffusersUNetNet, load_pretrained_unet, select_trainable
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


def train(
    recipe: Recipe,
    *,
    out: str | Path,
    progress: bool = True,
    grid_per_class: int = 10,
    audit: GradientCanaries | None = None,
) -> MethodResult:
    """DP-SGD fine-tuning of ``model.pretrained`` on the recipe's private data into run ``out``; then a grid
    (one row per class for a class-conditional UNet, else ``grid_per_class`` rows of 10 samples)."""
    pretrained = str(Path(recipe.model.pretrained or "").expanduser().resolve()) if recipe.model.pretrained else None
    recipe = dataclasses.replace(
        recipe, model=dataclasses.replace(recipe.model, pretrained=pretrained)
    )  # absolute: later commands read it
    dataset = private_dataset(recipe)
    device = default_device()
    # everything that can fail is checked before the run writes anything or reserves budget
    net = pretrained_net(recipe, like=dataset)
    select_trainable(net, recipe.model.trainable)  # a group or pattern that matches nothing is an error now
    check_stage(stage="dp_sgd", num_examples=len(dataset), train=recipe.train)
    check_plan(out, recipe, dataset)
    prior = weights_identity(Path(recipe.model.pretrained).expanduser())
    run = open_run(out, recipe)
    with run.starting():  # a start that still fails removes what it created
        ledger = open_ledger(run, recipe, dataset)
        ledger.record_public(stage="pretrained", data=prior, steps=0)
        ledger.save(run.ledger_path)
        stage = Stage(
            name="dp_sgd",
            init=lambda: net,
            select=lambda m: select_trainable(m, recipe.model.trainable),
            condition=_no_condition if net.num_classes is None else _labels(dataset, device),
            sigmas=DiscreteSigma(net.schedule),
        )
        result = train_denoiser(
            run=run, recipe=recipe, dataset=dataset, ledger=ledger, stage=stage, audit=audit, progress=progress
        )
    if net.num_classes is not None:
        grid = sample_class_grid(
            run, recipe, result.denoiser, num_classes=net.num_classes, per_class=grid_per_class, progress=progress
        )
    else:  # an unconditional UNet: grid_per_class rows of 10
        images = generate(
            result.denoiser,
            labels=None,
            n=10 * grid_per_class,
            recipe=recipe,
            seed=recipe.train.seed,
            progress=progress,
        )
        grid, _ = save_samples(run.samples, images, None, nrow=10)
    return MethodResult(run=run, grid=grid, ledger=ledger, steps=result.steps)
