"""Keep a benchmark's runs out of the user's budget registry and caches.

A benchmark trains on the built-in data to measure the toolkit, not to spend the user's budget: its runs
are registered in a registry of its own, with its own example key, and what it caches (feature networks,
real-data features) goes under its own output folder, never ``~/.privdiff`` or ``~/.cache/privdiff``.
"""

from __future__ import annotations

import os
from pathlib import Path


def isolate(out: str | os.PathLike) -> Path:
    """Point privdiff's budget registry, example key and cache at ``out`` for this process and every command
    it starts (``OUT/registry.sqlite``, created if new; ``OUT/registry.sqlite.key``; ``OUT/cache``).
    Returns the registry's path. A rerun with the same ``out`` reuses them (resumed runs are admitted again)."""
    from privdiff.privacy.registry import Registry

    out = Path(out).expanduser().absolute()
    registry = out / "registry.sqlite"
    Registry(registry, create=True).close()
    os.environ["PRIVDIFF_REGISTRY"] = str(registry)
    os.environ["PRIVDIFF_EXAMPLE_KEY_FILE"] = str(out / "registry.sqlite.key")
    os.environ["PRIVDIFF_CACHE"] = str(out / "cache")
    return registry
