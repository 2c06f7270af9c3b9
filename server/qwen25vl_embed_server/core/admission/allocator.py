"""glibc malloc settings that keep the process's resident memory close to its live buffers, so that
the memory limit (:mod:`~.memory`) holds for RSS, not only for the buffers the budgets count.

At glibc's defaults each thread that allocates gets an arena of its own (up to 8 per core), the
mmap threshold rises to the largest buffer freed (up to 32 MiB), and freed memory stays in the
arenas: after a large request, every preprocessing thread and model lane can keep that request's
buffers mapped. :func:`apply` sets what ``bench/overload/allocator.py`` measured to hold the line
at the least cost (see ``docs/security.md``, "Memory"); :func:`trim` gives freed memory back after
a large request. Elsewhere than glibc (musl, macOS) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass
from functools import cache
from typing import Any

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's malloc.h
MIB = 1 << 20


@dataclass(frozen=True)
class MallocSettings:
    """``arena_max``: arenas at most (None: glibc's). ``mmap_threshold``: buffers this large or
    larger are mapped on their own and unmapped when freed (fixed: no dynamic rise; None: glibc's).
    ``trim_threshold``: free memory at the top of the main heap beyond which it is given back
    (None: glibc's). ``trim_after_bytes``: :func:`trim` after a request that held this many bytes
    of pixels and tokens (None: never)."""

    arena_max: int | None = None
    mmap_threshold: int | None = None
    trim_threshold: int | None = None
    trim_after_bytes: int | None = None


SYSTEM = MallocSettings()
"""glibc's own behaviour."""
TUNED = MallocSettings(arena_max=2, trim_after_bytes=64 * MIB)
"""What the server applies under a memory limit (measured in ``bench/overload/allocator.py``)."""


@cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 - glibc only
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def apply(settings: MallocSettings) -> bool:
    """Set ``settings`` in this process's malloc (call before threads start: an arena, once made,
    stays). False where malloc is not glibc's or refused a value."""
    libc = _libc()
    if libc is None:
        return False
    applied = True
    for option, value in (
        (M_ARENA_MAX, settings.arena_max),
        (M_MMAP_THRESHOLD, settings.mmap_threshold),
        (M_TRIM_THRESHOLD, settings.trim_threshold),
    ):
        if value is not None and libc.mallopt(option, value) != 1:
            log.warning("malloc refused option %d = %d", option, value)
            applied = False
    return applied


def trim() -> bool:
    """Give freed memory back to the system (glibc's ``malloc_trim(0)``, every arena); True if any was."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
