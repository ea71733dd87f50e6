"""Atomic file writes: a failed command never leaves a half-written file behind.

A write goes to a temporary file beside its target, is fsynced, renamed over the target, and the
directory is fsynced, so after a kill (or a power cut) the target holds the old or the new content,
never a mix, and a later rename cannot overtake an earlier one on disk. A kill can leave the
temporary file itself behind (``.NAME.*.tmp``); :func:`remove_temporaries` clears them.

Under ``torchrun`` only rank 0 writes (:mod:`privdiff.distributed`): on other ranks these
functions write nothing (``atomic_directory`` yields a scratch directory that is then removed).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .distributed import is_main


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename over ``path``."""
    path = Path(path)
    if not is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_directory(path: str | os.PathLike) -> None:
    """Make the directory's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file and directory under ``path`` (before it is renamed into place)."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(root)


def remove_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporaries (``.NAME.*.tmp`` files and directories) a killed writer left under ``path``.

    Only safe while no other process writes there (a run holds its lock, :func:`privdiff.runs.open_run`).
    """
    found = sorted(Path(path).rglob(".*.tmp"), key=lambda p: -len(p.parts))
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a temporary directory; on success it is renamed to ``path`` (which must not exist)."""
    path = Path(path)
    if not is_main():  # the caller's writes go to scratch space and vanish
        with tempfile.TemporaryDirectory(prefix="privdiff-rank-") as scratch:
            yield Path(scratch)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
