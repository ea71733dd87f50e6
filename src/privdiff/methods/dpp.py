"""DPP / DP-FETA (Li et al.): warm up on noisy "central" images released with the Gaussian
mechanism, then DP-SGD, under one composed budget.

Stages, on the shared core:

1. ``central_images`` (private, a release): R rounds of Poisson-sampled per-class means with
   Gaussian noise at their L2 sensitivity (:mod:`privdiff.privacy.central`). The event (σ, q, R,
   Δ) is written to the ledger *before* the data is read; the images are saved as
   ``RUN/central/central.npz`` and ``RUN/central/grid.png``.
2. ``pretrain`` (post-processing): the DPDM UNet trained without DP on augmented copies of the
   released images (:func:`privdiff.data.augment.augment_copies`): no data access, no ledger event.
   With ``dpp.public_data``, it starts from a public warm start, stage ``public_pretrain``: the same UNet
   trained on public data framed like the private set (classes the private ones), through the one shared
   public stage (:func:`~privdiff.core.stages.pretrain`, cached by content hash), named in the ledger's
   ``public_stages`` and not part of ε.
3. ``dp_sgd`` (private): DPDM's DP-SGD from the pretrained EMA weights, with σ calibrated so that
   the release and DP-SGD *together* meet ``privacy.epsilon`` (the ledger's earlier events are
   the prior of the calibration).
"""

from __future__ import annotations

import copy
import dataclasses
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_write_bytes
from ..config import Recipe
from ..core.denoisers import pixel_net
from ..core.generation import sample_class_grid
from ..core.stages import MethodResult, pretrain, private_dataset, warm_start_data
from ..core.training import Stage, check_stage, train_denoiser
from ..data import ImageDataset
from ..data.augment import augment_copies
from ..privacy.audit import GradientCanaries
from ..privacy.budget import check_plan, open_ledger
from ..privacy.central import release_central_images, release_parameters
from ..privacy.events import SUBSAMPLED_GAUSSIAN, Release
from ..privacy.ledger import Ledger
from ..runs import Run, open_run, save_grid

STAGE = "central_images"
PUBLIC_STAGE = "public_pretrain"  # the public warm start (dpp.public_data); "pretrain" is the central images'


def release_event(recipe: Recipe, private: ImageDataset) -> Release:
    """The ledger event of the central-image release (computed from the recipe and the data's shape only)."""
    c = recipe.dpp
    q = min(1.0, c.batch_size / len(private))
    _, sensitivity = release_parameters(
        num_examples=len(private),
        num_classes=private.num_classes,
        sample_rate=q,
        channels=private.channels,
        height=private.resolution,
        width=private.resolution,
        downsample=c.downsample,
    )
    return Release(
        stage=STAGE,
        mechanism=SUBSAMPLED_GAUSSIAN,
        noise_multiplier=c.noise_multiplier,
        sample_rate=q,
        steps=c.rounds,
        sensitivity=sensitivity,
    )


def central_images(
    run: Run, recipe: Recipe, private: ImageDataset, ledger: Ledger
) -> tuple[torch.Tensor, torch.Tensor]:
    """The released central images in [0, 1] at full resolution, and their labels: read back if the
    release already ran, else released now (ledger first, then the data)."""
    path = run.path / "central" / "central.npz"
    if path.is_file():
        with np.load(path) as f:
            return torch.from_numpy(f["images"]), torch.from_numpy(f["labels"])
    c = recipe.dpp
    event = release_event(recipe, private)
    q, sensitivity = event.sample_rate, event.sensitivity
    run.commit_start()  # the run's work begins
    ledger.record(event)  # write-ahead: counted before the data is touched
    ledger.save(run.ledger_path)
    g = torch.Generator().manual_seed(recipe.train.seed * 1000 + 11)
    rel = release_central_images(
        (private.images + 1) / 2,
        private.labels,
        num_classes=private.num_classes,
        sample_rate=q,
        noise_multiplier=c.noise_multiplier,
        rounds=c.rounds,
        downsample=c.downsample,
        generator=g,
    )
    if abs(rel.sensitivity - sensitivity) > 1e-9 * sensitivity:
        raise RuntimeError(
            "internal error: the ledger's sensitivity is not the release's"
        )  # never report an unbacked epsilon
    images = F.interpolate(rel.images, size=private.resolution, mode="bilinear", align_corners=False).clamp(0, 1)
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images.numpy().astype(np.float32), labels=rel.labels.numpy().astype(np.int64))
    atomic_write_bytes(path, buf.getvalue())
    order = torch.argsort(rel.labels, stable=True)  # one row per class in the picture
    save_grid(run.path / "central" / "grid.png", images[order].numpy(), nrow=c.rounds)
    return images, rel.labels


def train(
    recipe: Recipe,
    *,
    out: str | Path,
    progress: bool = True,
    grid_per_class: int = 10,
    audit: GradientCanaries | None = None,
) -> MethodResult:
    """Release central images, pretrain on their augmentations (after a public warm start when ``dpp.public_data``
    names one), fine-tune with DP-SGD; sample a class grid.

    ``audit``: the canaries of ``privdiff audit`` (:mod:`privdiff.evaluation.audit`), put into the DP-SGD stage only."""
    c = recipe.dpp
    private = private_dataset(recipe)
    # everything that can fail is checked before the run writes anything, reserves budget or releases anything
    event = release_event(recipe, private)
    public = None if c.public_data is None else warm_start_data(recipe, like=private, section="dpp")
    if public is not None:
        check_stage(
            stage=PUBLIC_STAGE,
            num_examples=len(public),
            train=c.public_pretrain,
            build=lambda: pixel_net(recipe, private),
        )
    released_size = c.copies * c.rounds * private.num_classes  # augmented copies of R images per class
    check_stage(
        stage="pretrain", num_examples=released_size, train=c.pretrain, build=lambda: pixel_net(recipe, private)
    )
    check_stage(stage="dp_sgd", num_examples=len(private), train=recipe.train)
    check_plan(out, recipe, private, plan=[event])
    run = open_run(out, recipe, class_names=private.class_names)
    with run.starting():  # a start that still fails removes what it created
        ledger = open_ledger(run, recipe, private, plan=[event])
        images, labels = central_images(run, recipe, private, ledger)
    warm = None
    if public is not None:
        warm = pretrain(
            run, recipe, public, train=c.public_pretrain, ledger=ledger, name=PUBLIC_STAGE, progress=progress
        )
    aug, aug_labels = augment_copies(
        images,
        labels,
        copies=c.copies,
        num_ops=c.num_ops,
        magnitude=c.magnitude,
        generator=torch.Generator().manual_seed(recipe.train.seed * 1000 + 12),
    )
    # derived from the release only: not the private examples (no example identities of theirs)
    released = dataclasses.replace(private, images=aug * 2 - 1, labels=aug_labels, example_digests=None)
    pre = pretrain(
        run,
        recipe,
        released,
        train=c.pretrain,
        ledger=None,  # post-processing: no ledger event
        init=None if warm is None else lambda: copy.deepcopy(warm.denoiser.net).requires_grad_(True),
        progress=progress,
    )
    stage = Stage(name="dp_sgd", init=lambda: copy.deepcopy(pre.denoiser.net).requires_grad_(True))
    result = train_denoiser(
        run=run, recipe=recipe, dataset=private, ledger=ledger, stage=stage, audit=audit, progress=progress
    )
    grid = sample_class_grid(
        run, recipe, result.denoiser, num_classes=private.num_classes, per_class=grid_per_class, progress=progress
    )
    return MethodResult(run=run, grid=grid, ledger=ledger, steps=result.steps)
