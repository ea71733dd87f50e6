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

from pathlib import Path

import torch

from ..config import Recipe
from ..core.denoisers import default_device, load_decoder
from ..core.generation import sample_class_grid
from ..core.pipelines import (
    absolute_pretrained,
    caption_condition,
    captioned_latents,
    pretrained_net,
    trainable_chooser,
    weights_identity,
)
from ..core.stages import MethodResult, private_dataset
from ..core.training import Stage, check_stage, train_denoiser
from ..data import ImageDataset
from ..diffusion.discrete import DiscreteSigma
from ..models.pretrained import is_text_pipeline, load_text_pipeline
from ..privacy.audit import GradientCanaries
from ..privacy.budget import check_plan, open_ledger
from ..runs import open_run

__all__ = ["train"]


def _no_condition(idx: torch.Tensor, K: int, generator: torch.Generator) -> None:
    return None


def _labels(dataset: ImageDataset, device: torch.device):
    labels = dataset.labels.to(device)

    def condition(idx: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
        return labels[idx.to(device, non_blocking=True)][:, None].expand(
            -1, K
        )  # no null class to drop to: the net was not trained with one

    return condition


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
    recipe = absolute_pretrained(recipe)
    pretrained = recipe.model.pretrained
    device = default_device()
    # everything that can fail is checked before the run writes anything or reserves budget
    if is_text_pipeline(
        pretrained
    ):  # latents of the frozen VAE, conditioned on the captions by the frozen text encoder
        net = load_text_pipeline(pretrained)
        dataset, ids = captioned_latents(recipe, net)
        condition = caption_condition(ids, net.null_condition(), p=recipe.diffusion.label_dropout, device=device)
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
    # one row per class (a class-conditional UNet, or a text pipeline's class prompts), else grid_per_class rows of
    # 10 unconditional samples (a text pipeline's empty prompt); train --no-grid: grid_per_class = 0
    grid = sample_class_grid(
        run,
        recipe,
        result.denoiser,
        num_classes=net.num_classes,
        per_class=grid_per_class,
        decode=load_decoder(run),
        progress=progress,
    )
    return MethodResult(run=run, grid=grid, ledger=ledger, steps=result.steps)
