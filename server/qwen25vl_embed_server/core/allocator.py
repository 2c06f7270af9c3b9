"""Freed memory goes back to the system at once: glibc's mmap threshold fixed at 1 MiB.

glibc serves a large allocation with its own ``mmap`` (returned on ``free``) only above its mmap
threshold, which starts at 128 KiB and rises to the size of each large block freed, up to 32 MiB.
After a few images, the 3-25 MB buffers of one (decoded pixels, the processor's float32 copies,
the patches) come from the heap of the thread that allocated them, and stay there when freed:
each preprocessing thread and the model thread keep their own high-water mark, so the process's
RSS grows past what the budgets hold at once. Measured with the budgets of
``tests/rpc/test_memory_bound.py``: peaks of 79 to 188 MiB over the idle RSS, against 62 to 65
MiB with the threshold fixed (which also turns the rise off). Costs: one ``mmap``/``munmap`` and
the page faults per buffer of 1 MiB or more, small beside the work that fills it.

``MALLOC_MMAP_THRESHOLD_`` in the environment (glibc's own setting) is left to decide.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` for this process; False where the C
    library is not glibc or the environment sets it."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
