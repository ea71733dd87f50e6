"""The content-hash cache of public pretraining: runs on the same public data and model share one stage.

A public stage (:func:`privdiff.core.stages.pretrain` with a ledger: its data is public) is named by the
sha256 of a JSON description of everything that decides what it learns (:func:`stage_key`):

- ``version``: :data:`CACHE_VERSION` (bumped when the training loop or the entry's layout changes);
- ``data``: the public set's ledger identity (name, split, fingerprint, size), its resolution, channels and
  classes, and the sha256 of the images and labels *as trained on*: after resizing, framing and contrast,
  so ``<section>.public_size``, ``public_margin`` and ``public_contrast`` are in it through the content;
- ``model``: the files of the freshly built network (``save_pretrained`` of the stage's ``init()``, built
  under the stage's seed as :func:`~privdiff.core.training.train_denoiser` builds it): its config and its
  initial weights (DP-LDM's latent network includes its text encoder and tokenizer);
- ``train``: the stage's batch, epochs, max_steps, lr and schedule, EMA decay, physical batch and seed
  (not ``checkpoint_every``, which changes nothing learned) and the planned steps;
- ``diffusion``: the recipe's ``diffusion.*`` (parameterization, σ_data, p_train(σ), label dropout);
- ``extra``: what the caller adds (the settings of a conditioner other than the labels').

The device is not in the key: a stage trained on a GPU serves a CPU run with the same settings.

An entry is ``$PRIVDIFF_CACHE/pretrain/<key>/``: ``entry.json`` (the description, the checkpoint's name and
the sha256 of its ``state.json``, the stage's train-log lines) and ``checkpoints/step-NNNNNN/``, the stage's
last checkpoint as a run writes it (the sha256 of each of its files in ``state.json``). It is written as a
whole directory renamed into place (:func:`~privdiff.atomic.atomic_directory`). An entry that cannot be read,
describes another stage or whose files do not match their checksums is not used: the stage trains again
and replaces it. A run that takes a stage from the cache copies the checkpoint into ``RUN/stages/NAME/``,
so the run directory stays complete on its own (``load_net``, resume, export) if the cache is deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_directory, atomic_write_text
from ..config import Recipe, TrainConfig
from ..data import ImageDataset
from ..privacy.budget import data_identity, planned_steps
from ..runs import Run, RunError
from ..runtime import cache_dir
from .denoisers import pixel_net

__all__ = ["CACHE_VERSION", "StageKey", "restore_stage", "stage_key", "store_stage"]

CACHE_VERSION = 1  # bump when the training loop, the network files or the entry's layout change
KIND = "pretrain"  # $PRIVDIFF_CACHE/pretrain/<key>/
_LOG_KEYS = ("step", "loss", "lr")  # what an entry keeps of each train-log line of its stage


@dataclass(frozen=True)
class StageKey:
    """A public stage's cache key: the sha256 ``key`` of ``description`` (JSON), and its planned ``steps``."""

    key: str
    description: dict[str, Any]
    steps: int

    @property
    def path(self) -> Path:
        """The stage's entry, ``$PRIVDIFF_CACHE/pretrain/<key>`` (read at each call)."""
        return cache_dir() / KIND / self.key


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _data_digest(data: ImageDataset) -> str:
    h = hashlib.sha256(data.images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update(data.labels.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _network_files(net: torch.nn.Module) -> dict[str, str]:
    """sha256 of every file ``net.save_pretrained`` writes (config and weights), by relative path."""
    with tempfile.TemporaryDirectory(prefix="privdiff-key-") as tmp:
        net.save_pretrained(Path(tmp) / "net")
        root = Path(tmp) / "net"
        return {str(p.relative_to(root)): _sha256_bytes(p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def stage_key(
    recipe: Recipe,
    data: ImageDataset,
    *,
    train: TrainConfig,
    init: Callable[[], torch.nn.Module] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> StageKey:
    """The cache key of a public stage that trains ``init()`` (None: the recipe's pixel UNet for ``data``) on
    ``data`` with ``train`` and the recipe's diffusion settings; ``extra``: anything else that shapes what the
    stage learns (JSON values). Builds the fresh network once, under the stage's seed, without touching the
    global random state. See the module docstring for what the description holds."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train.seed)  # as train_denoiser does before it builds the network
        net = init() if init is not None else pixel_net(recipe, data)
    steps = planned_steps(train, len(data))
    if train.max_steps is not None:
        steps = min(steps, train.max_steps)
    # fp32 (the default) is left out, so that entries stored before train.precision existed keep their keys
    stage_train = {
        k: v
        for k, v in dataclasses.asdict(train).items()
        if k != "checkpoint_every" and not (k == "precision" and v == "fp32")
    }
    description = {
        "version": CACHE_VERSION,
        "data": {
            **data_identity(data),
            "resolution": data.resolution,
            "channels": data.channels,
            "num_classes": data.num_classes,
            "content_sha256": _data_digest(data),
        },
        "model": {"class": f"{type(net).__module__}.{type(net).__qualname__}", "files": _network_files(net)},
        "train": {**stage_train, "steps": steps},
        "diffusion": dataclasses.asdict(recipe.diffusion),
        "extra": dict(extra or {}),
    }
    description = json.loads(json.dumps(description, sort_keys=True, default=str))  # as it reads back from disk
    key = _sha256_bytes(json.dumps(description, sort_keys=True).encode())
    return StageKey(key=key, description=description, steps=steps)


def _valid_entry(key: StageKey) -> tuple[Path, dict[str, Any]] | None:
    """The entry's checkpoint directory and ``entry.json``, or None (absent, unreadable, another stage, damaged)."""
    path = key.path
    try:
        entry = json.loads((path / "entry.json").read_text())
        name = entry["checkpoint"]
        ckpt = path / "checkpoints" / name
        ok = (
            entry["key"] == key.key
            and entry["description"] == key.description
            and name == f"step-{key.steps:06d}"
            and _sha256_bytes((ckpt / "state.json").read_bytes()) == entry["state_sha256"]
            and isinstance(entry.get("log", []), list)
        )
        if not ok:
            return None
        Run(path).verify_checkpoint(ckpt)  # every file present and matching its checksum
    except (OSError, ValueError, KeyError, TypeError, RunError):
        return None
    return ckpt, entry


def restore_stage(run: Run, key: StageKey, *, stage: str) -> bool:
    """Put the cached stage ``key`` into ``run`` (a stage's Run, ``RUN/stages/NAME``) if the cache holds an intact
    entry and the run holds no checkpoint of its own: its checkpoint is copied to ``checkpoints/`` (where
    :func:`~privdiff.core.training.train_denoiser` resumes from it and takes no step) and its train-log lines are
    added to the run's log under ``stage``, marked ``"cached": true`` and taking no time. Returns whether it did.
    """
    if run.checkpoints.exists() and any(run.checkpoints.iterdir()):
        return False  # the run's own stage (done, or to resume): never replaced
    found = _valid_entry(key)
    if found is None:
        if key.path.exists():
            print(f"privdiff: {key.path}: damaged or stale pretraining cache entry; training it again", file=sys.stderr)
        return False
    ckpt, entry = found
    try:
        with atomic_directory(run.checkpoints / ckpt.name) as tmp:
            shutil.copytree(ckpt, tmp, dirs_exist_ok=True)
        atomic_write_text(run.checkpoints / "latest", ckpt.name + "\n")
    except OSError as e:  # the entry was replaced while it was read: train instead
        shutil.rmtree(run.checkpoints, ignore_errors=True)
        print(f"privdiff: {key.path}: could not be copied ({e}); training the stage", file=sys.stderr)
        return False
    clock = run.rewind_train_log(stage=stage, step=0)
    for line in entry.get("log", []):
        if isinstance(line, dict):
            run.append_train_log(
                {
                    "stage": stage,
                    **{k: line.get(k) for k in _LOG_KEYS},
                    "epsilon": None,
                    "time_s": clock,
                    "cached": True,
                }
            )
    return True


def store_stage(run: Run, key: StageKey, *, stage: str) -> bool:
    """Keep ``run``'s finished stage (its latest checkpoint at the planned step) as the cache entry of ``key``,
    replacing a damaged or stale one; an intact entry is left as it is. A failure to write (a read-only or
    full disk) is said on stderr and changes nothing else. Returns whether an entry was written."""
    try:
        ckpt = run.latest_checkpoint()
        if ckpt is None or ckpt.name != f"step-{key.steps:06d}" or _valid_entry(key) is not None:
            return False
        log = [
            {k: e.get(k) for k in _LOG_KEYS}
            for e in run.read_train_log()
            if e.get("stage") == stage and not e.get("cached")
        ]
        entry = {
            "key": key.key,
            "description": key.description,
            "checkpoint": ckpt.name,
            "state_sha256": _sha256_bytes((ckpt / "state.json").read_bytes()),
            "log": log,
        }
        with atomic_directory(key.path) as tmp:
            shutil.copytree(ckpt, tmp / "checkpoints" / ckpt.name)
            (tmp / "entry.json").write_text(json.dumps(entry, indent=1))
    except (OSError, RunError) as e:
        print(f"privdiff: warning: could not cache the {stage} stage in {key.path}: {e}", file=sys.stderr)
        return False
    return True
