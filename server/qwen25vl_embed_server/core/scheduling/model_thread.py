"""The threads that do torch's heavy work (loading and running the model), and what keeps every
other thread's torch ops on that thread alone.

Why so few: torch's CPU kernels run on OpenMP, and every thread that starts a parallel region
gets a team of worker threads of its own. GNU libgomp (what PyPI's torch ships) counts the
threads of all teams; once they outnumber the CPUs it throttles: an idle worker spins about 100
times instead of about 300,000 before it sleeps, so every one of the thousands of parallel
regions in a forward wakes its workers through the kernel. transformers' image processor runs
torch ops (its torchvision backend): one preprocessing thread with a team of its own was enough.
Measured here (2 cores, bf16, the ``bench`` checkpoint, one 448x448 image per run): 85 ms per
image with all torch work on one thread, 116 ms with preprocessing on another.

So the model runs on model threads alone: the one that loads it is the first of the model's
lanes (:mod:`~.model_lanes`, which says how a second lane on the CPU keeps to the cores), and each
other thread that may run torch ops calls :func:`single_threaded_torch` first (the preprocessing
workers do; so does the bulk actor, which Ray constructs on one thread and calls on another).
Small ops never start a team, so the event loop's bookkeeping needs nothing.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

_T = TypeVar("_T")


class ModelThread:
    """One worker thread for loading and running the model. :meth:`shutdown` ends it."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    async def call(self, function: Callable[..., _T], *args: object) -> _T:
        """Run ``function(*args)`` on the model thread; await its result on the running loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def run(self, function: Callable[..., _T], *args: object) -> _T:
        """Run ``function(*args)`` on the model thread and wait for its result (blocking callers)."""
        return self._executor.submit(function, *args).result()

    def shutdown(self, wait: bool = True) -> None:
        """End the thread (``wait`` False: without waiting for the run in progress; queued calls
        are dropped)."""
        self._executor.shutdown(wait=wait, cancel_futures=not wait)


def single_threaded_torch() -> None:
    """Make torch's OpenMP kernels run on the calling thread alone, with no team of its own: the
    model's threads keep their counts (see :func:`set_torch_threads`)."""
    set_torch_threads(1)


_thread_state = threading.local()


@functools.cache
def _openmp() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="openmp")


def set_torch_threads(count: int) -> None:
    """Set the calling thread's OpenMP thread count (torch's kernels and MKL's follow it), for this
    thread alone; cheap enough to call before every model run.

    torch sets a thread's OpenMP count lazily, the first time the thread asks for it or runs a
    parallel op: once ``torch.set_num_threads`` has run in the process, that set-up overwrites
    whatever count the thread had. So it is made to run first, once per thread (asking for the
    count does it; a small op does not), then threadpoolctl sets OpenMP's count, which is a
    setting of each thread. ``torch.set_num_threads`` is not used: it also changes what new
    threads start with.
    """
    if not getattr(_thread_state, "torch_ready", False):
        import torch

        torch.get_num_threads()  # torch's per-thread set-up of the OpenMP count, before ours
        _thread_state.torch_ready = True
    _openmp().limit(limits=count)
