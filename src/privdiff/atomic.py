"""Atomic file writes: a failed command never leaves a half-written file behind.

A write goes to a temporary file beside its target, is fsynced, renamed over the target, and the
directory is fsynced, so after a kill (or a power cut) the target holds the old or the new content,
never a mix, and a later rename cannot overtake an earlier one on disk. A kill can leave the
temporary itself behind: ``.NAME.XXXXXXXX.tmp`` beside its target NAME (XXXXXXXX: :mod:`tempfile`'s
eight random characters). :func:`remove_temporaries` clears those of given target names in one
directory, and nothing else: a user's own ``.something.tmp`` is never touched.

A failed write (a full disk included) raises :class:`OSError` and removes its temporary, so the
target keeps its previous content.

Under ``torchrun`` only rank 0 writes (:mod:`privdiff.distributed`): on other ranks these
functions write nothing (``atomic_directory`` yields a scratch directory that is then removed).
"""

from __future__ import annotations

import os
import re
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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a write error names no file: say which target failed
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
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


TEMPORARY_SUFFIX = r"\.[a-z0-9_]{8}\.tmp"  # what tempfile.mkstemp/mkdtemp add after ``.NAME.`` (its name sequence)


def remove_temporaries(directory: str | os.PathLike, *, targets: str) -> list[Path]:
    """Delete the temporaries this module's writers left in ``directory`` (not below it) for targets whose
    names fully match the regular expression ``targets``: entries named ``.NAME.XXXXXXXX.tmp``. Anything
    else, a user's own ``.notes.tmp`` included, stays.

    Only safe while no other process writes there (a run holds its lock, :func:`privdiff.runs.open_run`).
    """
    directory = Path(directory)
    if not directory.is_dir() or directory.is_symlink():
        return []
    pattern = re.compile(rf"\.(?:{targets}){TEMPORARY_SUFFIX}")
    found = sorted(p for p in directory.iterdir() if pattern.fullmatch(p.name))
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
    """Yield a temporary directory; on success it is renamed to ``path``.

    An existing ``path`` is replaced only once the new directory is complete: it is first renamed
    aside (to a temporary name), so a failure or a kill at any moment leaves the old directory or
    the new one at ``path`` (or, killed between the two renames, the old one under its temporary
    name, which :func:`remove_temporaries` clears), never a half-written one.
    """
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
        aside = None
        if path.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
            os.replace(path, aside)  # onto an empty directory: allowed
        try:
            os.replace(tmp, path)
        except BaseException:
            if aside is not None:
                os.replace(aside, path)  # put the old one back
            raise
        fsync_directory(path.parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
