"""DPDM (Dockhorn et al., TMLR 2023): a diffusion model trained from scratch with DP-SGD.

Recipe: EDM-preconditioned class-conditional UNet, DP-SGD with Poisson sampling, flat clipping,
noise multiplicity K, RDP accounting, noise calibrated to (ε, δ); then a class-by-class grid.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Recipe
from ..core.denoisers import pixel_net
from ..core.generation import sample_class_grid
from ..core.stages import MethodResult, private_dataset
from ..core.training import check_stage, train_denoiser
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
    """Train DPDM on the recipe's private data into run directory ``out`` and sample a class grid.

    ``audit``: the canaries of ``privdiff audit`` (:mod:`privdiff.evaluation.audit`), put into the DP-SGD stage."""
    dataset = private_dataset(recipe)
    # everything that can fail is checked before the run writes anything or reserves budget
    check_stage(stage="dp_sgd", num_examples=len(dataset), train=recipe.train, build=lambda: pixel_net(recipe, dataset))
    check_plan(out, recipe, dataset)
    run = open_run(out, recipe, class_names=dataset.class_names)
    with run.starting():  # a start that still fails removes what it created
        ledger = open_ledger(run, recipe, dataset)
        result = train_denoiser(run=run, recipe=recipe, dataset=dataset, ledger=ledger, progress=progress, audit=audit)
    grid = sample_class_grid(
        run, recipe, result.denoiser, num_classes=dataset.num_classes, per_class=grid_per_class, progress=progress
    )
    return MethodResult(run=run, grid=grid, ledger=ledger, steps=result.steps)
