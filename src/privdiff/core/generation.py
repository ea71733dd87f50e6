"""Drawing images from a trained denoiser: the recipe's sampler, conditions, guidance and decoder, in batches;
and the class grid every method ends with."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import Recipe
from ..diffusion import Denoiser, guided_denoiser, sample
from ..runs import Run, save_samples

__all__ = ["class_grid_labels", "generate", "sample_class_grid", "sample_labels"]


@torch.no_grad()
def generate(
    denoiser: Denoiser,
    *,
    labels: torch.Tensor | None,
    n: int,
    recipe: Recipe,
    prompts: list[str] | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int = 250,
    progress: bool = True,
) -> np.ndarray:
    """Draw ``n`` images with the recipe's sampler, conditioned on ``labels`` [n] and/or ``prompts``
    (one for all, or n; text needs a DP-LDM run); latents are decoded with ``decode``.
    Returns float32 [n, C, H, W] in [0, 1]."""
    s = recipe.sampler
    net = denoiser.net
    device = next(denoiser.parameters()).device
    cond = net.conditions(labels=labels, prompts=prompts, n=n)
    null = net.null_condition()
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in tqdm(range(0, n, batch_size), desc="sampling", unit="batch", disable=not progress, file=sys.stderr):
        c = None if cond is None else cond[start : start + batch_size].to(device)
        b = min(batch_size, n - start)
        fn = guided_denoiser(denoiser, c, guidance=s.guidance if c is not None else 0.0, null_label=null)
        x = sample(
            fn,
            shape=(b, *net.sample_shape),
            sampler=s.name,
            steps=steps or s.steps,
            sigma_min=s.sigma_min,
            sigma_max=s.sigma_max,
            rho=s.rho,
            generator=g,
            device=device,
            **(
                {"S_churn": s.S_churn, "S_min": s.S_min, "S_max": s.S_max, "S_noise": s.S_noise}
                if s.name in ("heun", "edm")
                else {}
            ),
        )
        if decode is not None:
            x = decode(x)
        out.append(((x.clamp(-1, 1) + 1) / 2).float().cpu().numpy())
    return np.concatenate(out)


def class_grid_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """Labels for a grid with one row per class: [0]*per_class + [1]*per_class + ..."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def sample_class_grid(
    run: Run,
    recipe: Recipe,
    denoiser: Denoiser,
    *,
    num_classes: int,
    per_class: int,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
) -> Path:
    """Draw ``per_class`` images of each class with the run's seed and save them as ``RUN/samples`` (grid.png, one row
    per class, and samples.npz); returns the grid's path. Every method's last stage."""
    labels = class_grid_labels(num_classes, per_class)
    images = generate(
        denoiser, labels=labels, n=len(labels), recipe=recipe, decode=decode, seed=recipe.train.seed, progress=progress
    )
    grid, _ = save_samples(run.samples, images, labels.numpy(), nrow=per_class)
    return grid


def sample_labels(
    *, n: int, num_classes: int | None, label: int | None = None, text: bool = False
) -> tuple[torch.Tensor | None, int]:
    """The labels of ``privdiff sample --n N`` and the images per grid row: ``label`` for all (a class of the run),
    none for a text prompt (``text``) or an unconditional run, one each of the first n classes when n is below
    their number, else a class grid (n rounded down to a multiple of the classes, one row per class)."""
    if label is not None:
        if num_classes is None or not 0 <= label < num_classes:
            raise ValueError(
                f"--label must be in [0, {num_classes}) for this run"
                if num_classes
                else "this run is unconditional: no --label"
            )
        return torch.full((n,), label), min(n, 10)
    if text or num_classes is None:
        return None, min(n, 10)
    if n < num_classes:  # fewer images than classes: one each of the first n
        return torch.arange(n), n
    per = n // num_classes
    return class_grid_labels(num_classes, per), per
