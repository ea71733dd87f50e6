"""Run directories, atomic checkpoints, resume.

```
RUN/
  config.yaml        the fully resolved recipe
  ledger.json        privacy ledger (privdiff.privacy.ledger), written ahead of every private step
  train_log.jsonl    one line per training step: stage, step, loss, epsilon, lr, time_s (cumulative)
  checkpoints/
    latest           name of the newest complete checkpoint
    step-000100/     unet/ and unet_ema/ (diffusers save_pretrained, safetensors),
                     optimizer.pt, rng.safetensors, state.json (step, sha256 of every file),
                     extra.pt when the stage carries state of its own (PrivateLoRA's attacker)
  samples/           grid.png, samples.npz
  autoencoder/       DP-LDM: the public autoencoder (diffusers AutoencoderKL)
  stages/pretrain/   DP-LDM: checkpoints of the public latent model (same layout as checkpoints/)
```
A checkpoint directory is written under a temporary name and renamed when complete, and
``latest`` is replaced atomically afterwards, so a kill at any moment leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from .atomic import atomic_directory, atomic_write_text, remove_temporaries
from .config import Recipe, recipe_to_dict, resolve_recipe
from .distributed import is_main


class RunError(ValueError):
    """A run directory or checkpoint that cannot be used (missing, corrupted, mismatched)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class TrainingState:
    """Everything needed to continue training exactly where a checkpoint left off."""

    step: int
    unet: torch.nn.Module  # the denoiser network (UNetNet, or DP-LDM's LatentNet), saved under unet/
    unet_ema: torch.nn.Module
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]  # generator name -> get_state() byte tensor
    # state of the stage's own components beside the network (e.g. PrivateLoRA's proxy attacker and
    # its optimizer: train_denoiser's ``state``), name -> state_dict; tensors, numbers, lists, dicts
    extra: dict[str, Any] = field(default_factory=dict)


class Run:
    """A run directory (see module docstring)."""

    def __init__(self, path: str | Path, *, train_log: Path | None = None):
        self.path = Path(path)
        self._train_log = train_log

    config_path = property(lambda self: self.path / "config.yaml")
    ledger_path = property(lambda self: self.path / "ledger.json")
    checkpoints = property(lambda self: self.path / "checkpoints")
    samples = property(lambda self: self.path / "samples")
    train_log_path = property(lambda self: self._train_log or self.path / "train_log.jsonl")

    def stage(self, name: str) -> "Run":
        """``RUN/stages/NAME``: the checkpoints of an earlier stage (e.g. public pretraining), logging into this run's log."""
        sub = Run(self.path / "stages" / name, train_log=self.train_log_path)
        sub.path.mkdir(parents=True, exist_ok=True)
        return sub

    # -- training log -------------------------------------------------------------------------
    def read_train_log(self) -> list[dict[str, Any]]:
        """Entries of ``train_log.jsonl``; a line cut short by a crash is skipped."""
        if not self.train_log_path.is_file():
            return []
        out = []
        for line in self.train_log_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and "step" in entry:
                out.append(entry)
        return out

    def rewind_train_log(self, *, stage: str, step: int) -> float:
        """Drop entries of ``stage`` after ``step`` (work lost since the checkpoint) and return the
        cumulative training time at that point, so a resumed run continues the clock."""
        kept = [e for e in self.read_train_log() if not (e.get("stage") == stage and e["step"] > step)]
        atomic_write_text(self.train_log_path, "".join(json.dumps(e) + "\n" for e in kept))
        return max((float(e.get("time_s", 0.0)) for e in kept), default=0.0)

    def append_train_log(self, entry: dict[str, Any]) -> None:
        if not is_main():  # under torchrun rank 0 alone writes
            return
        with open(self.train_log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    # -- config -------------------------------------------------------------------------------
    def save_config(self, recipe: Recipe) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))

    def load_config(self) -> Recipe:
        if not self.config_path.is_file():
            raise RunError(f"{self.path}: not a privdiff run (no config.yaml)")
        return resolve_recipe(yaml.safe_load(self.config_path.read_text()))

    # -- checkpoints --------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoints / "latest"
        if not pointer.is_file():
            return None
        path = self.checkpoints / pointer.read_text().strip()
        if not path.is_dir():
            raise RunError(f"{pointer}: points to missing checkpoint {path.name}")
        return path

    def discard_orphans(self) -> list[Path]:
        """Delete checkpoints newer than ``latest``: written by an attempt killed before it moved the
        pointer. The resumed run replays those steps with the same draws and writes them again, so
        no second copy of a step's output stays on disk."""
        if not is_main():  # under torchrun rank 0 alone writes (and deletes)
            return []
        latest = self.latest_checkpoint()
        orphans = [p for p in self.checkpoints.glob("step-*") if p.is_dir() and (latest is None or p.name > latest.name)]
        for p in orphans:
            shutil.rmtree(p)
        return orphans

    def save_checkpoint(self, state: TrainingState, *, keep: int = 2) -> Path:
        """Write ``checkpoints/step-NNNNNN`` atomically, point ``latest`` at it, keep the newest ``keep``."""
        name = f"step-{state.step:06d}"
        final = self.checkpoints / name
        if not is_main():  # under torchrun rank 0 alone writes
            return final
        if final.exists():
            shutil.rmtree(final)
        with atomic_directory(final) as tmp:
            state.unet.save_pretrained(tmp / "unet")  # a diffusers UNet directory (safetensors), plus a conditioner if any
            state.unet_ema.save_pretrained(tmp / "unet_ema")
            torch.save(state.optimizer, tmp / "optimizer.pt")
            save_file({k: v.contiguous() for k, v in state.rng.items()}, tmp / "rng.safetensors")
            if state.extra:
                torch.save(state.extra, tmp / "extra.pt")
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            meta = {"step": state.step, "sha256": {str(p.relative_to(tmp)): _sha256(p) for p in files}}
            (tmp / "state.json").write_text(json.dumps(meta, indent=2))
        atomic_write_text(self.checkpoints / "latest", name + "\n")
        old = sorted(p for p in self.checkpoints.glob("step-*") if p.is_dir() and p.name != name)
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path | None = None) -> TrainingState:
        """Load and verify a checkpoint (default: the latest); a damaged file is a clear error."""
        path = path or self.latest_checkpoint()
        if path is None:
            raise RunError(f"{self.path}: no checkpoint")
        state_file = path / "state.json"
        try:
            meta = json.loads(state_file.read_text())
        except (OSError, ValueError) as e:
            raise RunError(f"{state_file}: unreadable checkpoint metadata ({e})") from None
        for rel, digest in meta["sha256"].items():
            f = path / rel
            if not f.is_file():
                raise RunError(f"{f}: missing from checkpoint")
            if _sha256(f) != digest:
                raise RunError(f"{f}: corrupted (checksum mismatch); delete {path} to resume from an older checkpoint")
        return TrainingState(
            step=int(meta["step"]),
            unet=self.load_net(path, ema=False),
            unet_ema=self.load_net(path, ema=True),
            optimizer=torch.load(path / "optimizer.pt", weights_only=True),
            rng=load_file(path / "rng.safetensors"),
            extra=torch.load(path / "extra.pt", weights_only=True) if "extra.pt" in meta["sha256"] else {},
        )

    def load_net(self, path: Path | None = None, *, ema: bool = True) -> torch.nn.Module:
        """The (EMA) denoiser network of a checkpoint; its UNet via diffusers ``from_pretrained``, offline."""
        from .models import load_net

        path = path or self.latest_checkpoint()
        if path is None:
            raise RunError(f"{self.path}: no checkpoint to load")
        sub = path / ("unet_ema" if ema else "unet")
        try:
            return load_net(sub)
        except Exception as e:  # diffusers raises several types for unreadable files
            raise RunError(f"{sub}: cannot load UNet ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


# Keys that may change when a run is resumed: they change neither the data access nor the mechanism
# (sampling and evaluation happen after training).
RESUMABLE_KEYS = ("train.max_steps", "train.checkpoint_every", "sampler.", "evaluate.")


def open_run(out: str | Path, recipe: Recipe) -> Run:
    """Create ``out`` for ``recipe``, or reopen it to resume if it holds the same recipe.

    Only ``RESUMABLE_KEYS`` may differ on resume (e.g. raise ``train.max_steps`` to continue a
    smoke run); anything else would silently change what the ledger describes.
    """
    run = Run(out)
    run.path.mkdir(parents=True, exist_ok=True)
    if is_main():  # under torchrun rank 0 alone writes, so it alone locks the run and clears what a killed writer left
        lock_run(run)
        remove_temporaries(run.path)  # left by a killed writer; nobody else writes here while we hold the lock
    if run.config_path.exists():
        existing = run.load_config()
        diff = sorted(k for k in _diff(recipe_to_dict(existing), recipe_to_dict(recipe))
                      if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_KEYS))
        if diff:
            raise RunError(f"{run.path} holds a run with a different recipe ({', '.join(diff[:4])}); use a new --out")
    run.save_config(recipe)
    return run


_LOCKS: dict[str, int] = {}  # run directory -> open descriptor holding its lock (for this process's life)


def lock_run(run: Run) -> None:
    """Hold ``RUN/.lock`` (flock, exclusive): a second process training the same run is refused, not
    interleaved. The kernel releases the lock when the holder dies, even by SIGKILL."""
    key = str(run.path.resolve())
    if key in _LOCKS:
        return
    _LOCKS[key] = _flock(run.path)


def _flock(path: Path) -> int:
    """An open descriptor of ``path/.lock`` holding its exclusive flock, or RunError if another holds it."""
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunError(f"{path} is in use by another privdiff process") from None
    return fd


@contextlib.contextmanager
def held_lock(path: str | Path) -> Iterator[None]:
    """Hold run directory ``path``'s lock (as :func:`lock_run`) for the block only: RunError if a process
    is training it. This process's own lock (a run it opened) counts as held."""
    path = Path(path)
    if str(path.resolve()) in _LOCKS:
        yield
        return
    fd = _flock(path)
    try:
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def release_run(target: str | Path, *, registry=None, missing_ok: bool = False):
    """``privdiff budget release``: free the budget reservation of an abandoned run (crashed, never resumed).

    ``target`` is a run directory, its ``ledger.json``, or a run id (or a unique prefix of one, as
    ``budget status`` shows) in ``registry`` (a :class:`~privdiff.privacy.registry.Registry`; default:
    ``$PRIVDIFF_REGISTRY``). The run's lock is held while its registry entry is changed, so a run that
    is training (or resumes meanwhile) is refused. Its charge becomes what its ledger and the registry
    say it executed (spent steps stay spent). A run id whose directory is not on this machine is
    refused, since nothing shows it is not running elsewhere, unless ``missing_ok`` (then the
    registry's record alone is used). Returns ``(run id, the run's registry entry, freed events)``.
    """
    from .privacy.ledger import Ledger
    from .privacy.registry import Registry

    registry = registry or Registry()
    path = Path(target)
    if path.exists():
        path = path.parent if path.is_file() else path
        if not (path / "ledger.json").is_file():
            raise RunError(f"{path}: no ledger.json (not a private privdiff run)")
        run_id = Ledger.load(path / "ledger.json").run_id
    else:
        run_id, registered = registry.find_run(str(target))
        path = Path(registered) if registered else None
        if path is None or not path.is_dir():
            if not missing_ok:
                raise RunError(f"run {run_id[:12]}: its directory {registered} is not on this machine, so nothing shows that it is "
                               "not running elsewhere; release it from the machine that holds it, or pass --missing-ok if it is gone")
            entry, freed = registry.release(run_id=run_id)
            return run_id, entry, freed
    with held_lock(path):
        ledger = Ledger.load(path / "ledger.json")  # read under the lock: nothing writes it now
        if ledger.run_id != run_id:
            raise RunError(f"{path}: its ledger belongs to run {ledger.run_id[:12]}, not {run_id[:12]}")
        entry, freed = registry.release(run_id=run_id, executed=ledger.events)
    return run_id, entry, freed


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = set(a) | set(b)
    out = []
    for k in keys:
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}")
    return out


def image_grid(images: "np.ndarray", *, nrow: int, scale: int | None = None, pad: int = 2) -> "Image.Image":
    """Tile float images [n, C, H, W] in [0, 1] into one picture, ``nrow`` images per row.

    ``scale`` enlarges pixels (nearest); by default small images are shown at least 64 px wide.
    """
    import numpy as np
    from PIL import Image

    n, c, h, w = images.shape
    rows = -(-n // nrow)
    grid = np.ones((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.float32)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    arr = (grid.clip(0, 1) * 255).round().astype(np.uint8)
    pic = Image.fromarray(arr[0] if c == 1 else arr.transpose(1, 2, 0), mode="L" if c == 1 else "RGB")
    scale = max(1, 64 // w) if scale is None else scale
    return pic.resize((pic.width * scale, pic.height * scale), Image.NEAREST) if scale > 1 else pic


def save_samples(out: str | Path, images: "np.ndarray", labels: "np.ndarray | None", *, nrow: int) -> tuple[Path, Path]:
    """Write ``samples.npz`` (images in [0,1], labels) and ``grid.png`` into directory ``out``, atomically."""
    import io

    import numpy as np

    from .atomic import atomic_write_bytes

    out = Path(out)
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images.astype(np.float32), labels=np.asarray([] if labels is None else labels, dtype=np.int64))
    atomic_write_bytes(out / "samples.npz", buf.getvalue())
    save_grid(out / "grid.png", images, nrow=nrow)
    return out / "grid.png", out / "samples.npz"


def save_grid(path: str | Path, images: "np.ndarray", *, nrow: int) -> Path:
    """Write the :func:`image_grid` of ``images`` to ``path`` as PNG, atomically."""
    import io

    from .atomic import atomic_write_bytes

    png = io.BytesIO()
    image_grid(images, nrow=nrow).save(png, format="PNG")
    atomic_write_bytes(path, png.getvalue())
    return Path(path)
