"""Run directories, atomic checkpoints, resume.

```
RUN/
  config.yaml        the fully resolved recipe
  classes.json       the names of the data's classes (e.g. an image folder's sub-folders), for sample --label NAME
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
checkpoint intact. A resumed run starts from the newest *intact* checkpoint (every file present
and matching its checksum in ``state.json``): one that is damaged or missing is moved aside to
``checkpoints/damaged/`` (never deleted) and the run falls back to the one before it, saying so
on stderr (:meth:`Run.resume_checkpoint`).

A fresh run touches nothing on disk and reserves nothing in the budget registry before its recipe,
data, networks and noise calibration have been checked (each method's ``train``); if its start
still fails, :meth:`Run.starting` removes exactly what the start created, registry reservation
included. Temporaries a killed writer left are removed by exact name at the places a run writes
(:data:`RUN_TEMPORARIES`), never a user's own files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from .atomic import atomic_directory, atomic_write_text, remove_temporaries
from .config import Recipe, recipe_to_dict, resolve_recipe
from .distributed import is_main

if TYPE_CHECKING:  # annotations only (numpy and PIL are imported where images are written)
    import numpy as np
    from PIL import Image


class RunError(ValueError):
    """A run directory or checkpoint that cannot be used (missing, corrupted, mismatched)."""


CHECKPOINT_NAME = re.compile(r"step-\d{6}")

# Where a run writes (directories relative to the run, glob patterns) -> the names it writes there
# (a regular expression). A killed writer's temporaries are ``.NAME.XXXXXXXX.tmp`` beside them
# (privdiff.atomic); only those are removed when the run is opened again.
RUN_TEMPORARIES: dict[str, str] = {
    ".": r"config\.yaml|classes\.json|ledger\.json|train_log\.jsonl|splits\.json|audit\.json|metrics\.json|report\.html"
    r"|attacker_log\.jsonl|autoencoder",
    "checkpoints": r"latest|step-\d{6}",
    "stages/*/checkpoints": r"latest|step-\d{6}",
    "samples": r"samples\.npz|grid\.png",
    "central": r"central\.npz|grid\.png",
    "eval": r"samples\.npz|grid\.png|loss\.png|epsilon\.png",
    "attacks": r"[A-Za-z0-9_-]+\.(?:json|png)",
}

CONFIG_HEADER = "# privdiff run recipe (fully resolved); it ends with the line '# end'\n"
CONFIG_FOOTER = "# end\n"


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def resume_hint(run: "Run") -> str:
    """The command that continues ``run`` from its newest intact checkpoint (its own config.yaml is its recipe)."""
    return f"privdiff train {run.config_path} --out {run.path}"


@dataclass
class _Start:
    """What the start of a fresh run created (paths, registry reservation), undone if the start fails."""

    paths: list[Path] = field(default_factory=list)
    undo: list[Callable[[], None]] = field(default_factory=list)
    done: bool = False


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
        self._start: _Start | None = None  # set by open_run while a fresh start is in progress
        self.set_aside_step = (
            0  # newest step of a written checkpoint that resume_checkpoint could not use (damaged, or missing)
        )

    config_path = property(lambda self: self.path / "config.yaml")
    ledger_path = property(lambda self: self.path / "ledger.json")
    classes_path = property(lambda self: self.path / "classes.json")
    checkpoints = property(lambda self: self.path / "checkpoints")
    samples = property(lambda self: self.path / "samples")
    train_log_path = property(lambda self: self._train_log or self.path / "train_log.jsonl")

    def stage(self, name: str) -> "Run":
        """``RUN/stages/NAME``: the checkpoints of an earlier stage (e.g. public pretraining), logging into this run's log."""
        sub = Run(self.path / "stages" / name, train_log=self.train_log_path)
        sub._start = self._start
        for d in (sub.path.parent, sub.path):
            if not d.exists():
                d.mkdir()
                self.created(d)
        return sub

    # -- the start of a run -------------------------------------------------------------------
    def created(self, path: Path) -> None:
        """Note that the start of this run created ``path`` (removed if the start fails). Under torchrun rank 0
        alone writes, so it alone undoes."""
        if self._start is not None and not self._start.done and is_main():
            self._start.paths.append(Path(path))

    def on_undo(self, action: Callable[[], None]) -> None:
        """Run ``action`` if the start fails (e.g. withdraw a registry reservation the start made)."""
        if self._start is not None and not self._start.done:
            self._start.undo.append(action)

    def commit_start(self) -> None:
        """The run begins its work (a stage's first step): from here on a failure keeps what is on disk, to resume."""
        if self._start is not None:
            self._start.done = True

    @contextlib.contextmanager
    def starting(self) -> Iterator["Run"]:
        """Undo what the start of the run created if the block fails before :meth:`commit_start`:
        the registry reservation, the files and directories it made (ledger, config, lock, the run
        directory itself if it made it and nothing else is in it). What was there before stays."""
        try:
            yield self
        except BaseException:
            self.undo_start()
            raise
        self.commit_start()

    def undo_start(self) -> None:
        start = self._start
        if start is None or start.done:
            return
        start.done = True
        for action in reversed(start.undo):
            try:
                action()
            except Exception as e:  # the original failure is what the user must see; say what could not be undone
                print(f"privdiff: warning: could not undo the start of {self.path}: {_first_line(e)}", file=sys.stderr)
        _unlock(self)
        for p in reversed(start.paths):
            try:
                if p.is_dir() and not p.is_symlink():
                    p.rmdir()  # only if empty: whatever else is in it stays
                else:
                    p.unlink(missing_ok=True)
            except OSError:
                pass

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
        text = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
        atomic_write_text(self.config_path, CONFIG_HEADER + text + CONFIG_FOOTER)

    def load_config(self) -> Recipe:
        """The run's recipe; a damaged ``config.yaml`` (unreadable, not YAML, cut short, not a recipe) is a RunError."""
        if not self.config_path.is_file():
            raise RunError(f"{self.path}: not a privdiff run (no config.yaml)")
        try:
            text = self.config_path.read_text()
            data = yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise RunError(f"{self.config_path}: damaged ({_first_line(e)})") from None
        if text.startswith(CONFIG_HEADER) and not text.endswith(CONFIG_FOOTER):
            raise RunError(f"{self.config_path}: damaged (cut short: it does not end with '# end')")
        if not isinstance(data, dict) or not data:
            raise RunError(f"{self.config_path}: damaged (not a recipe: a YAML {type(data).__name__})")
        try:
            return resolve_recipe(data)
        except Exception as e:  # the recipe parser's own errors: ValueError, and TypeError/KeyError on odd shapes
            raise RunError(f"{self.config_path}: damaged (not a valid recipe: {_first_line(e)})") from None

    def save_class_names(self, names: tuple[str, ...] | list[str]) -> None:
        """Keep the names of the data's classes (label i is ``names[i]``) in ``RUN/classes.json``."""
        atomic_write_text(self.classes_path, json.dumps({"class_names": [str(n) for n in names]}, indent=2) + "\n")

    def class_names(self) -> tuple[str, ...] | None:
        """The class names the run kept (:meth:`save_class_names`); None for a run that kept none (an older run,
        or data without names). A damaged file is a RunError."""
        if not self.classes_path.is_file():
            return None
        try:
            names = json.loads(self.classes_path.read_text())["class_names"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RunError(f"{self.classes_path}: damaged ({_first_line(e)})") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RunError(f"{self.classes_path}: damaged (class_names must be a list of strings)")
        return tuple(names)

    # -- checkpoints --------------------------------------------------------------------------
    def _pointer(self) -> str | None:
        """The checkpoint name ``latest`` holds; None if there is no pointer; RunError if it is damaged."""
        pointer = self.checkpoints / "latest"
        if not pointer.is_file():
            return None
        try:
            name = pointer.read_text().strip()
        except (OSError, ValueError) as e:
            raise RunError(f"{pointer}: unreadable ({_first_line(e)})") from None
        if not CHECKPOINT_NAME.fullmatch(name):
            raise RunError(f"{pointer}: damaged (holds {name[:40]!r}, not a checkpoint name)")
        return name

    def _checkpoint_dirs(self) -> list[Path]:
        """The checkpoint directories, newest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(
            (p for p in self.checkpoints.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()), reverse=True
        )

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint ``latest`` points to (None before the first one); RunError if the pointer is
        damaged or its checkpoint is missing, with the command that resumes from the newest intact one."""
        try:
            name = self._pointer()
        except RunError as e:
            raise RunError(f"{e}; to continue from the newest intact checkpoint: {resume_hint(self._top())}") from None
        if name is None:
            return None
        path = self.checkpoints / name
        if not path.is_dir():
            raise RunError(
                f"{self.checkpoints / 'latest'}: points to missing checkpoint {name}; "
                f"to continue from the newest intact checkpoint: {resume_hint(self._top())}"
            )
        return path

    def _top(self) -> "Run":
        """The run itself (for a stage's Run: the run that holds it)."""
        return Run(self.path.parent.parent) if self.path.parent.name == "stages" else self

    def verify_checkpoint(self, path: Path, *, only: str | None = None) -> dict[str, Any]:
        """``state.json`` of checkpoint ``path`` after checking that its files (those under ``only``, if given)
        are present and match their checksums; RunError saying what is damaged otherwise."""
        state_file = path / "state.json"
        try:
            meta = json.loads(state_file.read_text())
            digests = meta["sha256"]
            step = meta["step"]
            if not (
                isinstance(digests, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in digests.items())
                and isinstance(step, int)
                and not isinstance(step, bool)
                and step >= 0
            ):
                raise ValueError("unexpected content")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RunError(
                f"{state_file}: unreadable checkpoint metadata ({type(e).__name__}: {_first_line(e)})"
            ) from None
        if f"step-{step:06d}" != path.name:
            raise RunError(f"{state_file}: damaged (records step {step}, the checkpoint is {path.name})")
        for rel, digest in digests.items():
            if only is not None and not rel.startswith(only + "/"):
                continue
            f = path / rel
            if ".." in Path(rel).parts or not f.is_file():
                raise RunError(f"{f}: missing from checkpoint")
            try:
                ok = _sha256(f) == digest
            except OSError as e:
                raise RunError(f"{f}: unreadable ({_first_line(e)})") from None
            if not ok:
                raise RunError(f"{f}: corrupted (checksum mismatch)")
        return meta

    def resume_checkpoint(self, *, what: str = "training") -> Path | None:
        """The newest intact checkpoint to resume from, or None (start from step 0).

        Candidates are the one ``latest`` points to and the older ones (newer ones are orphans, see
        :meth:`discard_orphans`); if the pointer is damaged or points to a missing checkpoint, every
        checkpoint is a candidate. A damaged candidate is moved to ``checkpoints/damaged/`` (kept, not
        deleted), said on stderr, and the next older one is tried; ``latest`` is then repointed to
        the one chosen. Every candidate is a complete checkpoint whose steps the ledger counted
        (write-ahead), so the ledger stays the run's: the steps after it were spent and stay counted.
        A set-aside checkpoint's output had left the process (it was written), so the steps it
        covers are not replayed with the same draws but taken afresh and counted again
        (:attr:`set_aside_step`; :func:`privdiff.privacy.budget.replayed_steps`).
        """
        try:
            name = self._pointer()
            damaged_pointer = None
        except RunError as e:
            name, damaged_pointer = None, str(e)
        if name is None and damaged_pointer is None:
            return None  # no pointer: nothing was completed (orphans are discarded)
        dirs = self._checkpoint_dirs()
        candidates = dirs if damaged_pointer else [p for p in dirs if p.name <= name]
        notes = [damaged_pointer] if damaged_pointer else []
        if name is not None and not (self.checkpoints / name).is_dir():
            notes.append(f"{self.checkpoints / 'latest'}: points to missing checkpoint {name}")
            step = re.fullmatch(r"step-(\d+)", name)  # it was written (and published) before it went missing
            self.set_aside_step = max(self.set_aside_step, int(step.group(1)) if step else 0)
        chosen = None
        for path in candidates:
            try:
                self.verify_checkpoint(path)
            except RunError as e:
                notes.append(f"{e} (moved to {self._set_aside(path)})")
                step = re.fullmatch(r"step-(\d+)", path.name)
                self.set_aside_step = max(self.set_aside_step, int(step.group(1)) if step else 0)
                continue
            chosen = path
            break
        if notes:
            fallback = (
                f"resuming {what} from {chosen.name}, the newest intact checkpoint"
                if chosen
                else f"no intact checkpoint is left: {what} starts again from step 0"
            )
            for note in notes:
                print(f"privdiff: {note}", file=sys.stderr)
            print(f"privdiff: {fallback}; the ledger keeps every step already counted", file=sys.stderr)
            if is_main():
                if chosen is not None:
                    atomic_write_text(self.checkpoints / "latest", chosen.name + "\n")
                else:
                    (self.checkpoints / "latest").unlink(missing_ok=True)
        return chosen

    def _set_aside(self, path: Path) -> Path:
        """Move a damaged checkpoint to ``checkpoints/damaged/`` (a fresh name there), where no resume looks."""
        target = self.checkpoints / "damaged" / path.name
        if not is_main():
            return target
        target.parent.mkdir(exist_ok=True)
        n = 1
        while target.exists():
            n += 1
            target = target.with_name(f"{path.name}-{n}")
        os.replace(path, target)
        return target

    def discard_orphans(self) -> list[Path]:
        """Delete checkpoints newer than ``latest``: written by an attempt killed before it moved the
        pointer. The resumed run replays those steps with the same draws and writes them again, so
        no second copy of a step's output stays on disk. Call after :meth:`resume_checkpoint`."""
        if not is_main():  # under torchrun rank 0 alone writes (and deletes)
            return []
        latest = self.latest_checkpoint()
        orphans = [p for p in self._checkpoint_dirs() if latest is None or p.name > latest.name]
        for p in orphans:
            shutil.rmtree(p)
        return orphans

    def save_checkpoint(self, state: TrainingState, *, keep: int = 2) -> Path:
        """Write ``checkpoints/step-NNNNNN`` atomically, point ``latest`` at it, keep the newest ``keep``."""
        name = f"step-{state.step:06d}"
        final = self.checkpoints / name
        if not is_main():  # under torchrun rank 0 alone writes
            return final
        try:
            with atomic_directory(final) as tmp:  # replaces an existing one only once the new one is complete
                state.unet.save_pretrained(
                    tmp / "unet"
                )  # a diffusers UNet directory (safetensors), plus a conditioner if any
                state.unet_ema.save_pretrained(tmp / "unet_ema")
                torch.save(state.optimizer, tmp / "optimizer.pt")
                save_file({k: v.contiguous() for k, v in state.rng.items()}, tmp / "rng.safetensors")
                if state.extra:
                    torch.save(state.extra, tmp / "extra.pt")
                files = sorted(p for p in tmp.rglob("*") if p.is_file())
                meta = {"step": state.step, "sha256": {str(p.relative_to(tmp)): _sha256(p) for p in files}}
                (tmp / "state.json").write_text(json.dumps(meta, indent=2))
        except OSError as e:
            raise OSError(
                e.errno,
                f"cannot write checkpoint {final} ({e.strerror or _first_line(e)}); "
                f"the previous checkpoints are intact",
            ) from None
        except Exception as e:  # torch.save and safetensors report a failed write (a full disk) as RuntimeError & co.
            free = shutil.disk_usage(self.checkpoints).free
            raise OSError(
                f"cannot write checkpoint {final} ({type(e).__name__}: {_first_line(e)}; {free:,} bytes free "
                f"on its disk); the previous checkpoints are intact"
            ) from None
        atomic_write_text(self.checkpoints / "latest", name + "\n")
        old = sorted(p for p in self._checkpoint_dirs() if p.name != name)
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path | None = None) -> TrainingState:
        """Load and verify a checkpoint (default: the latest); a damaged file is a clear error."""
        path = path or self.latest_checkpoint()
        if path is None:
            raise RunError(f"{self.path}: no checkpoint")
        meta = self.verify_checkpoint(path)
        try:
            return TrainingState(
                step=int(meta["step"]),
                unet=self.load_net(path, ema=False, verify=False),
                unet_ema=self.load_net(path, ema=True, verify=False),
                optimizer=torch.load(path / "optimizer.pt", weights_only=True),
                rng=load_file(path / "rng.safetensors"),
                extra=torch.load(path / "extra.pt", weights_only=True) if "extra.pt" in meta["sha256"] else {},
            )
        except RunError:
            raise
        except Exception as e:  # intact files that still do not load (written by another version)
            raise RunError(f"{path}: cannot load checkpoint ({type(e).__name__}: {_first_line(e)})") from None

    def load_net(self, path: Path | None = None, *, ema: bool = True, verify: bool = True) -> torch.nn.Module:
        """The (EMA) denoiser network of a checkpoint; its UNet via diffusers ``from_pretrained``, offline.

        ``verify``: check its files against the checkpoint's checksums first (a damaged file is a RunError
        that says how to continue from the newest intact checkpoint, never weights silently misread)."""
        from .models.saved import load_net

        path = path or self.latest_checkpoint()
        if path is None:
            raise RunError(f"{self.path}: no checkpoint to load")
        sub = path / ("unet_ema" if ema else "unet")
        if verify:
            try:
                self.verify_checkpoint(path, only=sub.name)
            except RunError as e:
                raise RunError(
                    f"{e}; to continue from the newest intact checkpoint: {resume_hint(self._top())}"
                ) from None
        try:
            return load_net(sub)
        except Exception as e:  # diffusers raises several types for unreadable files
            raise RunError(f"{sub}: cannot load UNet ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


# Keys that may change when a run is resumed: they change neither the data access nor the mechanism
# (sampling and evaluation happen after training).
RESUMABLE_KEYS = ("train.max_steps", "train.checkpoint_every", "sampler.", "evaluate.")


def check_run(out: str | Path, recipe: Recipe) -> bool:
    """Whether ``out`` holds a run of ``recipe`` to resume (False: it will be a fresh run); RunError if
    it cannot be used for ``recipe`` (not a directory, a damaged config.yaml, a different recipe).
    Reads only: called before anything is written.

    Only ``RESUMABLE_KEYS`` may differ on resume (e.g. raise ``train.max_steps`` to continue a
    smoke run); anything else would silently change what the ledger describes.
    """
    run = Run(out)
    if run.path.exists() and not run.path.is_dir():
        raise RunError(f"{run.path} exists and is not a directory; use a new --out")
    if not run.config_path.exists():
        return False
    existing = run.load_config()
    diff = sorted(
        k
        for k in _diff(recipe_to_dict(existing), recipe_to_dict(recipe))
        if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_KEYS)
    )
    if diff:
        raise RunError(f"{run.path} holds a run with a different recipe ({', '.join(diff[:4])}); use a new --out")
    return True


def open_run(out: str | Path, recipe: Recipe, *, class_names: tuple[str, ...] | None = None) -> Run:
    """Create ``out`` for ``recipe``, or reopen it to resume if it holds the same recipe (:func:`check_run`).

    Call it once the recipe, data, networks and noise calibration are known to work: it is the first
    write of a run. What it creates is noted, so :meth:`Run.starting` can undo it if the start fails.
    ``class_names``: the names of the private data's classes, kept in ``RUN/classes.json`` so that later
    commands (``privdiff sample --label NAME``) know them without reading the data again.
    """
    check_run(out, recipe)
    run = Run(out)
    run._start = _Start()
    missing = [d for d in (run.path, *run.path.parents) if not d.exists()]
    run.path.mkdir(parents=True, exist_ok=True)
    for d in reversed(missing):  # outermost first, so the undo removes the innermost first
        run.created(d)
    try:
        if (
            is_main()
        ):  # under torchrun rank 0 alone writes, so it alone locks the run and clears what a killed writer left
            if not (run.path / ".lock").exists():
                run.created(run.path / ".lock")
            lock_run(run)
            remove_run_temporaries(run)  # left by a killed writer; nobody else writes here while we hold the lock
        check_run(out, recipe)  # again, under the lock: a process that held it may have written config.yaml meanwhile
        if not run.config_path.exists():
            run.created(run.config_path)
        run.save_config(recipe)
        if class_names and is_main():
            if not run.classes_path.exists():
                run.created(run.classes_path)
            run.save_class_names(class_names)
    except BaseException:
        run.undo_start()
        raise
    return run


def remove_run_temporaries(run: Run) -> list[Path]:
    """Delete the temporaries a killed privdiff writer left in ``run`` (:data:`RUN_TEMPORARIES`), nothing else."""
    found = []
    for where, targets in RUN_TEMPORARIES.items():
        for d in [run.path] if where == "." else sorted(run.path.glob(where)):
            found += remove_temporaries(d, targets=targets)
    return found


_LOCKS: dict[str, int] = {}  # run directory -> open descriptor holding its lock (for this process's life)


def lock_run(run: Run) -> None:
    """Hold ``RUN/.lock`` (flock, exclusive): a second process training the same run is refused, not
    interleaved. The kernel releases the lock when the holder dies, even by SIGKILL."""
    key = str(run.path.resolve())
    if key in _LOCKS:
        return
    _LOCKS[key] = _flock(run.path)


def _unlock(run: Run) -> None:
    """Release this process's lock of ``run`` (the start of the run failed and was undone)."""
    fd = _LOCKS.pop(str(run.path.resolve()), None)
    if fd is not None:
        os.close(fd)


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
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img
    arr = (grid.clip(0, 1) * 255).round().astype(np.uint8)
    pic = Image.fromarray(arr[0] if c == 1 else arr.transpose(1, 2, 0), mode="L" if c == 1 else "RGB")
    scale = max(1, 64 // w) if scale is None else scale
    return pic.resize((pic.width * scale, pic.height * scale), Image.NEAREST) if scale > 1 else pic


def save_samples(out: str | Path, images: "np.ndarray", labels: "np.ndarray | None", *, nrow: int) -> tuple[Path, Path]:
    """Write ``samples.npz`` (images in [0,1], labels) and ``grid.png`` into directory ``out``, atomically."""
    out = Path(out)
    save_npz(out / "samples.npz", images, labels)
    save_grid(out / "grid.png", images, nrow=nrow)
    return out / "grid.png", out / "samples.npz"


def save_npz(path: str | Path, images: "np.ndarray", labels: "np.ndarray | None") -> Path:
    """Write ``images`` (float32 in [0, 1]) and ``labels`` (int64; empty if none) to one .npz, atomically."""
    import io

    import numpy as np

    from .atomic import atomic_write_bytes

    buf = io.BytesIO()
    np.savez_compressed(
        buf, images=images.astype(np.float32), labels=np.asarray([] if labels is None else labels, dtype=np.int64)
    )
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def save_grid(path: str | Path, images: "np.ndarray", *, nrow: int) -> Path:
    """Write the :func:`image_grid` of ``images`` to ``path`` as PNG, atomically."""
    import io

    from .atomic import atomic_write_bytes

    png = io.BytesIO()
    image_grid(images, nrow=nrow).save(png, format="PNG")
    atomic_write_bytes(path, png.getvalue())
    return Path(path)
