"""Drawing images from a trained denoiser: the recipe's sampler, conditions, guidance and decoder, in batches;
and the class grid every method ends with."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import Recipe
from ..diffusion import Denoiser, guided_denoiser, sample
from ..diffusion.discrete import VPDenoiser
from ..diffusion.schedulers import make_scheduler, sample_scheduler
from ..runs import Run, save_samples

__all__ = ["class_grid_labels", "class_index", "generate", "sample_class_grid", "sample_labels", "sigma_range"]


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
    Returns float32 [n, C, H, W] in [0, 1].

    ``sampler.scheduler`` (a pretrained net's runs only) samples with the pipeline's own diffusers scheduler
    (DDIM, PNDM/PLMS, Euler, DPM-Solver, ...) on the net's timesteps (:mod:`privdiff.diffusion.schedulers`);
    otherwise privdiff's sampler ``sampler.name`` runs on the Karras σ grid.

    ``progress``: one bar on stderr that moves with every sampler step of every batch (a batch of
    250 images at 64 steps is 64 ticks, not one); it only counts, so the images are the same without it."""
    s = recipe.sampler
    lo, hi = sigma_range(denoiser)
    net = denoiser.net
    device = next(denoiser.parameters()).device
    cond = net.conditions(labels=labels, prompts=prompts, n=n)
    null = net.null_condition()
    g = torch.Generator(device=device).manual_seed(seed)
    n_steps = steps or s.steps
    scheduler = None
    if s.scheduler is not None:
        if not isinstance(denoiser, VPDenoiser):
            raise ValueError(
                f"sampler.scheduler={s.scheduler}: the pipeline schedulers sample a pretrained discrete-time net "
                "(method dp-finetune); this run's denoiser is privdiff's own: use sampler.name"
            )
        scheduler = make_scheduler(s.scheduler, net.scheduler_config)
    batches = range(0, n, batch_size)
    bar = tqdm(
        total=len(batches) * n_steps,
        desc=f"sampling {n} image{'s' * (n != 1)}",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    out = []
    for i, start in enumerate(batches):
        c = None if cond is None else cond[start : start + batch_size].to(device)
        b = min(batch_size, n - start)
        fn = guided_denoiser(denoiser, c, guidance=s.guidance if c is not None else 0.0, null_label=null)
        if scheduler is not None:
            x = sample_scheduler(
                fn,
                scheduler=scheduler,
                schedule=denoiser.schedule,
                shape=(b, *net.sample_shape),
                steps=n_steps,
                generator=g,
                device=device,
                callback=lambda _state: bar.update(1),
            )
        else:
            x = sample(
                fn,
                shape=(b, *net.sample_shape),
                sampler=s.name,
                steps=n_steps,
                sigma_min=max(s.sigma_min, lo),
                sigma_max=min(s.sigma_max, hi),
                rho=s.rho,
                generator=g,
                device=device,
                callback=lambda _state: bar.update(1),
                **(
                    {"S_churn": s.S_churn, "S_min": s.S_min, "S_max": s.S_max, "S_noise": s.S_noise}
                    if s.name in ("heun", "edm")
                    else {}
                ),
            )
        if decode is not None:
            x = decode(x)
        out.append(((x.clamp(-1, 1) + 1) / 2).float().cpu().numpy())
        bar.update((i + 1) * n_steps - bar.n)  # the batch is done, whatever its sampler reported
        bar.set_postfix(images=start + b, refresh=False)
    bar.close()
    return np.concatenate(out)


def sigma_range(denoiser) -> tuple[float, float]:
    """The noise levels a denoiser was trained on: a discrete-time net's table σ_0..σ_{T-1} (a sampler asked to
    start above or stop below it is held inside it, as k-diffusion does for DDPM nets); any σ for privdiff's EDM nets."""
    if isinstance(denoiser, VPDenoiser):
        sigmas = denoiser.schedule.sigmas()
        return float(sigmas[0]), float(sigmas[-1])
    return 0.0, float("inf")


def class_grid_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """Labels for a grid with one row per class: [0]*per_class + [1]*per_class + ..."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def sample_class_grid(
    run: Run,
    recipe: Recipe,
    denoiser: Denoiser,
    *,
    num_classes: int | None,
    per_class: int,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
) -> Path | None:
    """Draw ``per_class`` images of each class with the run's seed and save them as ``RUN/samples`` (grid.png, one row
    per class, and samples.npz); returns the grid's path. An unconditional model (``num_classes=None``; a text
    pipeline's empty prompt, never a private caption) gets ``per_class`` rows of 10. Every method's last stage;
    ``per_class=0`` (``privdiff train --no-grid``) draws nothing and returns None."""
    if per_class == 0:
        return None
    labels = None if num_classes is None else class_grid_labels(num_classes, per_class)
    n = 10 * per_class if labels is None else len(labels)
    images = generate(
        denoiser, labels=labels, n=n, recipe=recipe, decode=decode, seed=recipe.train.seed, progress=progress
    )
    grid, _ = save_samples(
        run.samples, images, None if labels is None else labels.numpy(), nrow=10 if labels is None else per_class
    )
    return grid


def class_index(label: int | str, *, num_classes: int | None, class_names: Sequence[str] | None = None) -> int:
    """The class ``label`` names: one of ``class_names`` (a folder's sub-folder name, say), else an index in
    [0, num_classes). A name is looked up first, so a class called "3" is that class, whatever its index.

    Raises:
        ValueError: One line: the run is unconditional, or ``label`` is no class of it (the names are listed).
    """
    if not num_classes:
        raise ValueError("this run is unconditional: no --label")
    names = list(class_names or [])
    if isinstance(label, str):
        if label in names:
            return names.index(label)
        try:
            label = int(label.strip())
        except ValueError:
            label = None
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < num_classes:
        return label
    if names:
        shown = ", ".join(names[:50]) + (f", ... ({len(names)} in all)" if len(names) > 50 else "")
        raise ValueError(f"--label must be a class of this run: a name ({shown}) or an index in [0, {num_classes})")
    raise ValueError(f"--label must be in [0, {num_classes}) for this run (it kept no class names)")


def sample_labels(
    *,
    n: int,
    num_classes: int | None,
    label: int | str | None = None,
    class_names: Sequence[str] | None = None,
    text: bool = False,
) -> tuple[torch.Tensor | None, int]:
    """The labels of ``privdiff sample --n N`` and the images per grid row: ``label`` for all (a class of the run,
    by name among ``class_names`` or by index: :func:`class_index`), none for a text prompt (``text``) or an
    unconditional run, one each of the first n classes when n is below their number, else a class grid (n rounded
    down to a multiple of the classes, one row per class)."""
    if label is not None:
        return torch.full((n,), class_index(label, num_classes=num_classes, class_names=class_names)), min(n, 10)
    if text or num_classes is None:
        return None, min(n, 10)
    if n < num_classes:  # fewer images than classes: one each of the first n
        return torch.arange(n), n
    per = n // num_classes
    return class_grid_labels(num_classes, per), per
