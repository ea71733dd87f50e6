"""Stages and pieces that methods compose, so that a method file is only its method: the private data
set of a recipe (and of a trained run), public data framed like it, a public pretraining stage (shared
between runs through a content-hash cache, :mod:`privdiff.core.pretrain_cache`), DP-LDM's public
autoencoder, and the one result type every method returns."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from ..atomic import atomic_directory
from ..distributed import current_world
from ..config import Recipe, TrainConfig
from ..data import NO_TEST_SPLIT, DatasetError, ImageDataset, load_dataset
from ..data.captioned import load_captioned_folder
from ..data.splits import holdout_indices
from ..data.files import no_test_split_error
from ..data.membership import TRAINED_ON_MEMBERS, MembershipSplits
from ..models.autoencoder import autoencoder_loss, build_autoencoder, encode_latents
from ..models.pretrained import is_text_pipeline, pipeline_image_shape
from ..privacy.budget import data_identity
from ..privacy.ledger import Ledger
from ..runs import Run
from .denoisers import default_device
from .pretrain_cache import restore_stage, stage_key, store_stage
from .training import Conditioner, Stage, TrainResult, train_denoiser

__all__ = [
    "MethodResult",
    "frame_images",
    "pretrain",
    "private_dataset",
    "private_training_set",
    "public_data",
    "recipe_dataset",
    "require_test_split",
    "templated_dataset",
    "train_autoencoder",
    "warm_start_data",
]


@dataclass
class MethodResult:
    """What every method's ``train`` returns: its run, the class grid it drew (None: none was asked for,
    ``grid_per_class=0``), its ledger and its private steps."""

    run: Run
    grid: Path | None
    ledger: Ledger
    steps: int


def recipe_dataset(recipe: Recipe, *, split: str = "train") -> ImageDataset:
    """One split of the recipe's data ``data.*``: the one place a recipe's data is read.

    ``data.resolution`` resizes it; for data without a test split of its own (an image folder or zip),
    ``data.holdout`` / ``data.holdout_seed`` or ``data.test_root`` say what ``"test"`` is, and ``"train"``
    is what remains (never the held-out images). Training, ``budget cap``, ``audit``, ``evaluate`` and
    ``attack`` all read the data through here, so they all see the same parts.

    Raises:
        DatasetError: The data cannot be read, or ``split="test"`` of data with no test split
            (the message names ``data.holdout`` and ``data.test_root``).
    """
    if is_text_pipeline(recipe.model.pretrained):  # text-to-image data: captioned images
        return captioned_dataset(recipe, split=split)
    d = recipe.data
    return _load_data(recipe, split=split, resolution=d.resolution)


def _load_data(recipe: Recipe, *, split: str, resolution: int | None) -> ImageDataset:
    d = recipe.data
    return load_dataset(
        d.name,
        root=d.root,
        split=split,
        resolution=resolution,
        holdout=d.holdout,
        holdout_seed=d.holdout_seed,
        test_root=d.test_root,
    )


def captioned_dataset(recipe: Recipe, *, split: str = "train") -> ImageDataset:
    """One split of a captioned image folder (``data.root``; text-to-image data for a pipeline in ``model.pretrained``)
    as images in [-1, 1] at the pipeline's size (or ``data.resolution``), one class, with their captions.

    ``data.holdout`` holds out that fraction (drawn once from ``data.holdout_seed``) as the test split,
    never trained on; without it there is no test split. The fingerprint of a part covers the images, the
    captions, the part, the fraction and the seed, so the ledger names exactly what was trained on.
    """
    d = recipe.data
    channels, size = pipeline_image_shape(recipe.model.pretrained)
    if d.prompt_template is not None:
        return templated_dataset(recipe, split=split, channels=channels, resolution=d.resolution or size)
    if d.test_root is not None:
        raise DatasetError("data.test_root: not for captioned images; hold out a part with data.holdout")
    data = load_captioned_folder(d.root, resolution=d.resolution or size, channels=channels)
    n, whole = len(data), split == "all" or (split == "train" and d.holdout is None)
    if whole:
        idx, fingerprint = np.arange(n), data.fingerprint
    elif d.holdout is None:
        raise DatasetError(f"{d.root}: captioned images have no test split; hold out a part with data.holdout=0.1")
    else:
        train, test = holdout_indices(np.zeros(n, dtype=np.int64), fraction=d.holdout, seed=d.holdout_seed)
        idx = {"train": train, "test": test}[split]
        part = f"{data.fingerprint}|{split}|holdout={d.holdout}|seed={d.holdout_seed}"
        fingerprint = "sha256:" + hashlib.sha256(part.encode()).hexdigest()
    held = None if whole else d.holdout
    dataset = ImageDataset(
        images=data.images[torch.from_numpy(idx)],
        labels=torch.zeros(len(idx), dtype=torch.long),
        num_classes=1,
        name="captioned",
        split="all" if whole else split,
        fingerprint=fingerprint,
        holdout=held,
        holdout_seed=None if held is None else d.holdout_seed,
        example_digests=data.digests[idx],  # each image's identity in the budget registry (not its caption)
        captions=tuple(data.captions[i] for i in idx),
    )
    return dataset


def templated_dataset(recipe: Recipe, *, split: str, channels: int, resolution: int) -> ImageDataset:
    """One split of class-labelled data (``data.*``, any data set with classes) for a text pipeline, each image
    captioned ``data.prompt_template`` with its class name ("a photo of a {}" → "a photo of a tulip").

    The caption is a function of the label alone (it carries nothing the label does not), so the data set,
    its fingerprint and its examples' identities are the labelled data's. Gray images are repeated to the
    pipeline's 3 channels, as diffusers' training scripts convert them to RGB."""
    data = _load_data(recipe, split=split, resolution=resolution)
    if data.channels != channels:
        if (data.channels, channels) != (1, 3):
            raise DatasetError(
                f"{data.name} has {data.channels}-channel images; the pipeline's VAE takes {channels} channels"
            )
        data = dataclasses.replace(data, images=data.images.expand(-1, 3, -1, -1).contiguous())
    names = data.class_names or tuple(str(c) for c in range(data.num_classes))
    template = recipe.data.prompt_template
    return dataclasses.replace(data, captions=tuple(template.format(names[int(c)]) for c in data.labels))


def private_dataset(recipe: Recipe) -> ImageDataset:
    """The recipe's private data: the training split of ``data.*`` (:func:`recipe_dataset`)."""
    return recipe_dataset(recipe, split="train")


def require_test_split(recipe: Recipe) -> None:
    """Refuse, before any work, a recipe whose data has no test split (``evaluate`` and ``attack`` need one):
    an image folder without ``data.holdout`` or ``data.test_root``, or a ``data.test_root`` that is gone.
    Reads no image: the test split itself is read only when a command's protocol says so.

    Raises:
        DatasetError: One line naming ``data.holdout`` and ``data.test_root``.
    """
    d = recipe.data
    if d.name not in NO_TEST_SPLIT or d.holdout is not None:
        return
    if d.test_root is None:
        raise no_test_split_error(d.root)
    if not Path(d.test_root).exists():
        raise DatasetError(
            f"{d.test_root}: data.test_root is not there (a folder or .zip of test images; "
            "was it moved? the run's config.yaml names it)"
        )


def private_training_set(run: Run, recipe: Recipe) -> ImageDataset:
    """The private examples ``run`` trained on, which its ledger describes: the recipe's training split,
    or, for a run that trained on the members of ``RUN/splits.json`` only (a LoRA run), that member set."""
    pool = private_dataset(recipe)
    path = run.path / "splits.json"
    if path.is_file():
        splits = MembershipSplits.load(path)
        if splits.trained_on == TRAINED_ON_MEMBERS:
            return splits.members(pool)
    return pool


def frame_images(images: torch.Tensor, *, margin: int, contrast: float) -> torch.Tensor:
    """Images [N, C, H, W] on [-1, 1] with contrast g = ``contrast``: x ← tanh(g·x)/tanh(g) (g = 0: unchanged),
    then framed by ``margin`` pixels of background (−1) on every side: [N, C, H + 2m, W + 2m]."""
    if contrast > 0:
        images = torch.tanh(contrast * images) / math.tanh(contrast)  # soft blobs back into strokes
    if margin:
        images = F.pad(images, (margin, margin, margin, margin), value=-1.0)  # the digit in a box of its frame
    return images


def public_data(recipe: Recipe, *, like: ImageDataset, section: str) -> ImageDataset:
    """The public data set ``<section>.public_data`` at the private set ``like``'s resolution (its channels and
    classes must match), drawn at ``resolution − 2·<section>.public_margin`` and framed by a background
    margin (MNIST's digits sit in a 20×20 box of a 28×28 image; scikit-learn's fill their 8×8 frame),
    with contrast ``<section>.public_contrast`` = g: x ← tanh(g·x)/tanh(g) on [-1, 1] (g = 0: unchanged),
    which turns the soft blobs of 8×8 images enlarged 2.5× back into strokes on a black background.

    ``section`` is the recipe section that holds the ``public_*`` keys: ``ldm`` (DP-LDM), ``lora`` (LoRA's
    pretraining), ``dpdm`` or ``dpp`` (their warm starts); errors name that section's keys.
    ``<section>.public_size`` draws that many training examples of ``glyphs`` (the other sets have theirs)."""
    L, resolution = getattr(recipe, section), like.resolution
    inner = resolution - 2 * L.public_margin
    if L.public_margin < 0:
        raise ValueError(f"{section}.public_margin={L.public_margin} must be >= 0")
    if inner < 4:
        raise ValueError(f"{section}.public_margin={L.public_margin} leaves no image at resolution {resolution}")
    try:
        public = load_dataset(L.public_data, root=L.public_root, split="all", resolution=inner, size=L.public_size)
    except DatasetError as e:
        raise DatasetError(f"{section}.public_data={L.public_data}: {e}") from None
    images = frame_images(public.images, margin=L.public_margin, contrast=L.public_contrast)
    if (public.channels, public.num_classes) != (like.channels, like.num_classes):
        raise ValueError(
            f"{section}.public_data={public.name} has {public.channels} channels and {public.num_classes} classes, "
            f"private {like.name} {like.channels} and {like.num_classes}: they must match"
        )
    return dataclasses.replace(public, images=images)


def warm_start_data(recipe: Recipe, *, like: ImageDataset, section: str) -> ImageDataset:
    """The public data of a class-conditional warm start of the private model (DPDM's, DPP's): :func:`public_data`,
    whose classes must also be the private set's by name where both name them (a label means the same class in
    both stages: glyphs and digits are the digits "0".."9", like MNIST).

    Raises:
        ValueError: Channels, number of classes or class names differ (one line naming ``<section>.public_data``).
    """
    public = public_data(recipe, like=like, section=section)
    if public.class_names is not None and like.class_names is not None and public.class_names != like.class_names:
        shown = ", ".join(public.class_names[:4]), ", ".join(like.class_names[:4])
        raise ValueError(
            f"{section}.public_data={public.name} has the classes {shown[0]}, ..., private {like.name} {shown[1]}, ...: "
            "a warm start is conditioned on the public labels, so they must be the same classes"
        )
    return public


def pretrain(
    run: Run,
    recipe: Recipe,
    data: ImageDataset,
    *,
    train: TrainConfig,
    ledger: Ledger | None,
    init=None,
    condition: Conditioner | None = None,
    name: str = "pretrain",
    cache_extra: dict | None = None,
    progress: bool = True,
) -> TrainResult:
    """The pretraining stage ``name`` (``RUN/stages/NAME``): the one training loop without DP on ``data``, K = 1
    (a public stage needs no variance reduction). ``ledger``: the run's ledger, which names ``data`` as the
    stage's public data (None: ``data`` was derived from a release the ledger already counts).

    A public stage (a ``ledger`` given) is shared between runs: keyed by content hash (public data as trained
    on, network config and initial weights, ``train``, ``diffusion.*``, ``cache_extra``:
    :mod:`privdiff.core.pretrain_cache`), it is copied from ``$PRIVDIFF_CACHE/pretrain`` into the run when an
    intact entry exists and the run has no checkpoint of its own, and kept there once trained. A stage with
    a ``condition`` of its own is cached only with ``cache_extra`` (the conditioner's settings); a stage on
    data derived from a release, or under torchrun, is never cached. Either way the ledger records the same."""
    stage = Stage(name=name, train=train, noise_multiplicity=1, init=init, condition=condition)
    sub = run.stage(name)
    key, hit = None, False
    if ledger is not None and (condition is None or cache_extra is not None) and not current_world().distributed:
        key = stage_key(recipe, data, train=train, init=init, extra=cache_extra)
        hit = restore_stage(sub, key, stage=name)
    result = train_denoiser(run=sub, recipe=recipe, dataset=data, ledger=None, stage=stage, progress=progress)
    if key is not None and not hit:
        store_stage(sub, key, stage=name)
    if ledger is not None:
        ledger.record_public(stage=name, data=data_identity(data), steps=result.steps)
        ledger.save(run.ledger_path)
    return result


def train_autoencoder(*, run: Run, recipe: Recipe, public: ImageDataset, ledger: Ledger, progress: bool = True):
    """Train DP-LDM's ``AutoencoderKL`` on ``public`` data (non-private), or load it from ``RUN/autoencoder``.

    Adam on the per-example loss of :func:`~privdiff.models.autoencoder.autoencoder_loss` over
    uniformly drawn public batches; then the latent scaling factor s = 1/std(μ(x)) over the
    public images (Rombach et al. 2022), so latents have unit variance. The directory is written
    atomically when the stage is complete; the ledger notes the stage and its public data.
    """
    path, cfg, device = run.path / "autoencoder", recipe.ldm.autoencoder, default_device()
    if (path / "config.json").is_file():
        return (
            AutoencoderKL.from_pretrained(path, local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False)
            .to(device)
            .eval()
        )
    torch.manual_seed(recipe.train.seed)
    g = torch.Generator(device=device).manual_seed(recipe.train.seed * 1000 + 7)
    ae = build_autoencoder(cfg, in_channels=public.channels, resolution=public.resolution).to(device).train()
    run.commit_start()  # the run's work begins
    opt = torch.optim.Adam(ae.parameters(), lr=cfg.lr)
    images, N = public.images.to(device), len(public)
    steps = max(1, round(cfg.epochs * N / cfg.batch_size))
    clock = run.rewind_train_log(stage="autoencoder", step=0) - time.perf_counter()
    bar = tqdm(range(steps), desc="autoencoder", unit="step", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    for step in bar:
        idx = torch.randint(0, N, (min(cfg.batch_size, N),), generator=g, device=device)
        loss = autoencoder_loss(ae, images[idx], kl_weight=cfg.kl_weight, generator=g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        run.append_train_log(
            {
                "stage": "autoencoder",
                "step": step + 1,
                "loss": loss.item(),
                "epsilon": None,
                "lr": cfg.lr,
                "time_s": round(clock + time.perf_counter(), 3),
            }
        )
    ae.eval()
    z = encode_latents(ae, images)
    ae.register_to_config(scaling_factor=float(1.0 / z.std()))  # s: unit-variance latents
    with atomic_directory(path) as tmp:
        ae.save_pretrained(tmp, safe_serialization=True)
    ledger.record_public(stage="autoencoder", data=data_identity(public), steps=steps)
    ledger.save(run.ledger_path)
    return ae
