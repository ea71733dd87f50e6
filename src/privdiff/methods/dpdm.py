"""DPDM (Dockhorn et al., TMLR 2023): a diffusion model trained from scratch with DP-SGD.

Recipe: EDM-preconditioned class-conditional UNet, DP-SGD with Poisson sampling, flat clipping,
noise multiplicity K, RDP accounting, noise calibrated to (ε, δ); then a class-by-class grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Recipe
from ..data import load_dataset
from ..privacy.ledger import Ledger
from ..runs import Run, open_run, save_samples
from .budget import check_plan, open_ledger
from .stages import check_stage, class_grid_labels, generate, pixel_net, train_denoiser

if TYPE_CHECKING:
    from ..privacy.audit import GradientCanaries


@dataclass
class DPDMResult:
    run: Run
    grid: Path
    ledger: Ledger
    steps: int


def train(recipe: Recipe, *, out: str | Path, progress: bool = True, grid_per_class: int = 10,
          audit: GradientCanaries | None = None) -> DPDMResult:
    """Train DPDM on the recipe's private data into run directory ``out`` and sample a class grid.

    ``audit``: the canaries of ``privdiff audit`` (:mod:`privdiff.methods.audit`), put into the DP-SGD stage."""
    d = recipe.data
    dataset = load_dataset(d.name, root=d.root, split="train", resolution=d.resolution)
    # everything that can fail is checked before the run writes anything or reserves budget
    check_stage(stage="dp_sgd", num_examples=len(dataset), train=recipe.train, build=lambda: pixel_net(recipe, dataset))
    check_plan(out, recipe, dataset)
    run = open_run(out, recipe)
    with run.starting():  # a start that still fails removes what it created
        ledger = open_ledger(run, recipe, dataset)
        result = train_denoiser(run=run, recipe=recipe, dataset=dataset, ledger=ledger, progress=progress, audit=audit)
    labels = class_grid_labels(dataset.num_classes, grid_per_class)
    images = generate(result.denoiser, labels=labels, n=len(labels), recipe=recipe, seed=recipe.train.seed, progress=progress)
    grid, _ = save_samples(run.samples, images, labels.numpy(), nrow=grid_per_class)
    return DPDMResult(run=run, grid=grid, ledger=ledger, steps=result.steps)
