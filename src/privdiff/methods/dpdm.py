"""DPDM (Dockhorn et al., TMLR 2023): a diffusion model trained from scratch with DP-SGD; with a public
warm start, PDP-Diffusion (Ghalebikesabi et al. 2023; DPImageBench's "public pretraining, then DP-SGD").

Recipe: EDM-preconditioned class-conditional UNet, DP-SGD with Poisson sampling, flat clipping,
noise multiplicity K, RDP accounting, noise calibrated to (ε, δ); then a class-by-class grid.

Stages, on the shared core:

1. ``pretrain`` (public, only with ``dpdm.public_data``): the same UNet, without DP, on the public data
   framed like the private set and conditioned on its labels (the classes must be the private ones), through
   the one shared public stage (:func:`~privdiff.core.stages.pretrain`, cached by content hash). The ledger
   names it under ``public_stages``; it is not part of ε.
2. ``dp_sgd`` (private): DP-SGD from scratch, or from the pretrained EMA weights. σ is calibrated for this
   stage alone, so ε is the same as a cold start with the same private settings.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..config import Recipe
from ..core.denoisers import pixel_net
from ..core.generation import sample_class_grid
from ..core.stages import MethodResult, pretrain, private_dataset, warm_start_data
from ..core.training import Stage, check_stage, train_denoiser
from ..privacy.audit import GradientCanaries
from ..privacy.budget import check_plan, open_ledger
from ..runs import open_run


def train(
    recipe: Recipe,
    *,
    out: str | Path,
    progress: bool = True,
    grid_per_class: int = 10,
    audit: GradientCanaries | None = None,
) -> MethodResult:
    """Train DPDM on the recipe's private data into run directory ``out`` (after a public warm start when
    ``dpdm.public_data`` names one) and sample a class grid.

    ``audit``: the canaries of ``privdiff audit`` (:mod:`privdiff.evaluation.audit`), put into the DP-SGD stage."""
    D = recipe.dpdm
    dataset = private_dataset(recipe)
    # everything that can fail is checked before the run writes anything or reserves budget
    public = None if D.public_data is None else warm_start_data(recipe, like=dataset, section="dpdm")
    if public is not None:
        check_stage(
            stage="pretrain", num_examples=len(public), train=D.pretrain, build=lambda: pixel_net(recipe, public)
        )
    check_stage(stage="dp_sgd", num_examples=len(dataset), train=recipe.train, build=lambda: pixel_net(recipe, dataset))
    check_plan(out, recipe, dataset)
    run = open_run(out, recipe, class_names=dataset.class_names)
    with run.starting():  # a start that still fails removes what it created
        ledger = open_ledger(run, recipe, dataset)
        pre = None
        if public is not None:
            pre = pretrain(run, recipe, public, train=D.pretrain, ledger=ledger, progress=progress)
    stage = Stage(
        name="dp_sgd",
        init=None if pre is None else lambda: copy.deepcopy(pre.denoiser.net).requires_grad_(True),
    )
    result = train_denoiser(
        run=run, recipe=recipe, dataset=dataset, ledger=ledger, stage=stage, progress=progress, audit=audit
    )
    grid = sample_class_grid(
        run, recipe, result.denoiser, num_classes=dataset.num_classes, per_class=grid_per_class, progress=progress
    )
    return MethodResult(run=run, grid=grid, ledger=ledger, steps=result.steps)
