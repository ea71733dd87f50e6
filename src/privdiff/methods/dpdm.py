"""DPDM (Dockhorn et al., TMLR 2023): a diffusion model trained from scratch with DP-SGD.

Recipe: EDM-preconditioned class-conditional UNet, DP-SGD with Poisson sampling, flat clipping,
noise multiplicity K, RDP accounting, noise calibrated to (ε, δ); then a class-by-class grid.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import Recipe, recipe_to_dict
from ..data import load_dataset
from ..privacy.ledger import Ledger
from ..runs import Run, RunError, save_samples
from .stages import class_grid_labels, generate, train_denoiser


@dataclass
class DPDMResult:
    run: Run
    grid: Path
    ledger: Ledger
    steps: int


# Keys that may change when a run is resumed: they change neither the data access nor the mechanism.
RESUMABLE_KEYS = ("train.max_steps", "train.checkpoint_every", "sampler.")


def open_run(out: str | Path, recipe: Recipe) -> Run:
    """Create ``out`` for ``recipe``, or reopen it to resume if it holds the same recipe.

    Only ``RESUMABLE_KEYS`` may differ on resume (e.g. raise ``train.max_steps`` to continue a
    smoke run); anything else would silently change what the ledger describes.
    """
    run = Run(out)
    if run.config_path.exists():
        existing = run.load_config()
        diff = sorted(k for k in _diff(recipe_to_dict(existing), recipe_to_dict(recipe))
                      if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_KEYS))
        if diff:
            raise RunError(f"{run.path} holds a run with a different recipe ({', '.join(diff[:4])}); use a new --out")
    else:
        run.path.mkdir(parents=True, exist_ok=True)
    run.save_config(recipe)
    return run


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = set(a) | set(b)
    out = []
    for k in keys:
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}")
    return out


def open_ledger(run: Run, recipe: Recipe, dataset) -> Ledger:
    """The run's ledger (continued on resume), checked against the private data it must describe."""
    identity = {"name": dataset.name, "split": dataset.split, "fingerprint": dataset.fingerprint, "size": len(dataset)}
    if run.ledger_path.exists():
        ledger = Ledger.load(run.ledger_path)
        if ledger.dataset.get("fingerprint") != dataset.fingerprint:
            raise RunError(f"{run.ledger_path}: recorded for data {ledger.dataset.get('fingerprint')}, not {dataset.fingerprint}")
        return ledger
    return Ledger(
        delta=recipe.privacy.delta, accountant=recipe.privacy.accountant, dataset=identity,
        target_epsilon=recipe.privacy.epsilon if recipe.privacy.enabled else None,
    )


def train(recipe: Recipe, *, out: str | Path, progress: bool = True, grid_per_class: int = 10) -> DPDMResult:
    """Train DPDM on the recipe's private data into run directory ``out`` and sample a class grid."""
    d = recipe.data
    dataset = load_dataset(d.name, root=d.root, split="train", resolution=d.resolution)
    run = open_run(out, recipe)
    ledger = open_ledger(run, recipe, dataset)
    result = train_denoiser(run=run, recipe=recipe, dataset=dataset, ledger=ledger, progress=progress)
    labels = class_grid_labels(dataset.num_classes, grid_per_class)
    images = generate(result.denoiser, labels=labels, n=len(labels), recipe=recipe, seed=recipe.train.seed, progress=progress)
    grid, _ = save_samples(run.samples, images, labels.numpy(), nrow=grid_per_class)
    return DPDMResult(run=run, grid=grid, ledger=ledger, steps=result.steps)
