"""Process-wide settings that make CPU training faster without changing any result.

glibc's allocator hands large freed blocks back to the kernel at once (``munmap``, or trimming
the heap top), so every training step maps them again and the kernel zero-fills each 4 KiB page
on first touch: on privdiff's demo UNet at batch 256 that is 18,000–26,000 page faults, tens of
milliseconds, per step. Intel's PyTorch CPU guide answers this with jemalloc or tcmalloc;
privdiff asks glibc itself to keep freed memory in the process (``mallopt``), which needs no
extra library. The memory stays reserved for the next step (resident size is the peak, as it
would be with a caching allocator); the numbers computed are the same.

Also the one rule for where privdiff keeps derived, re-creatable files (:func:`cache_dir`), on the lowest
floor so that every floor above (rendered public data sets, public pretraining stages, evaluation's
feature networks) uses the same place.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc <malloc.h>
_done = False


def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep freed memory for reuse (blocks ≤ 32 MiB from the heap, no trimming).

    Idempotent; returns whether the settings were applied (False off Linux/glibc, where nothing
    changes). Set ``PRIVDIFF_MALLOC=system`` to leave the allocator alone.
    """
    global _done
    if _done or os.environ.get("PRIVDIFF_MALLOC") == "system" or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    ok = (
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's ceiling for the threshold on 64-bit
        and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        and mallopt(_M_TOP_PAD, 256 << 20)
    )
    _done = bool(ok)
    return _done


def cache_dir() -> Path:
    """Where privdiff keeps derived, re-creatable files: ``$PRIVDIFF_CACHE`` or ``~/.cache/privdiff``.

    Read at each call, so a changed environment variable takes effect at once (tests point it at a
    temporary directory). Everything under it is named by the sha256 of what determines it and may be
    deleted at any time: it is made again when next needed."""
    return Path(os.environ.get("PRIVDIFF_CACHE") or Path.home() / ".cache" / "privdiff")
