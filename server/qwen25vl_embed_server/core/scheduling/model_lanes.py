"""The model's lanes: threads that run batches side by side on the one loaded model (the CPU).

Why: a forward split across all cores leaves some of them waiting. Each of the thousands of
parallel regions in a forward ends at a barrier, small ops split badly, and any other work on the
machine that pre-empts one of the team's threads (preprocessing, gRPC, the clients) stalls the
whole team at the next barrier. Two batches side by side, each on half the cores, keep the cores
busy. Measured at the server on 2 cores (the ``bench`` checkpoint, ``python -m
bench.service.model_lanes``): see the performance page of the docs.

**Widths.** A run on the first lane is *wide* (all of the model's threads) when nothing else runs
and nothing waits, so a lone request (concurrency 1) keeps all the cores; every other run is
*narrow* (its lane's share of the threads). No run starts beside a wide one: it waits for the
wide run to end, so the threads never outnumber the cores. Only the first lane runs wide, so on
2 cores (narrow: one thread) no lane but the first ever starts an OpenMP team of its own: GNU
libgomp throttles every spin-wait once the teams' threads outnumber the CPUs (see
:mod:`~.model_thread`).

Each lane is a :class:`~.model_thread.ModelThread`; the first one is the thread that loaded the
model. A run's width is set on its lane's thread before it starts: OpenMP's thread count is a
setting of each thread, and MKL follows it. A run's bits depend on its width wherever a kernel
splits a sum across threads or blocks rows by the thread count: MKL's AVX2 matmuls do, and so do
some AVX-512 ones at some shapes. So a narrow run equals the request run alone at the same width
bit for bit, and a wide run within float rounding, as batching promises (both tested); only a
wide run is transformers' computation at the process's thread count, bit for bit.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from qwen25vl_embed_server.core.scheduling.model_thread import ModelThread, set_torch_threads

_T = TypeVar("_T")
log = logging.getLogger(__name__)


def torch_threads() -> int:
    """The calling thread's torch thread count (OpenMP's; on the model thread: the model's)."""
    import torch

    return int(torch.get_num_threads())


class ModelLanes:
    """``count`` lanes over ``threads`` torch threads; ``first`` (the loading thread) is lane 0.

    Use on one event loop: :meth:`take` a free lane, :meth:`call` on it, :meth:`release` it.
    ``threads`` None: ``first``'s torch thread count. More lanes than threads are not made: each
    lane gets at least one thread. With one lane, the thread's count is never changed.
    """

    def __init__(self, first: ModelThread, count: int = 1, threads: int | None = None) -> None:
        if count < 1:
            raise ValueError(f"lanes must be at least 1, got {count}")
        if threads is None:  # one lane never sets a count: no need to ask the (maybe busy) thread
            threads = first.run(torch_threads) if count > 1 else 1
        self.threads = threads
        self.count = max(1, min(count, self.threads))
        self.narrow = max(1, self.threads // self.count)
        self._lanes = [first] + [ModelThread() for _ in range(self.count - 1)]
        if self.count > 1:
            log.info(
                "model lanes: %d, %d torch thread(s) each; a lone request runs on %d",
                self.count,
                self.narrow,
                self.threads,
            )
        self._free = list(self._lanes)
        self._running = 0  # calls awaited on the loop: what decides a width (a cancelled one no longer counts)
        self._wide = False
        self._changed = asyncio.Event()
        self._lock = threading.Lock()
        self._in_threads = 0  # runs in progress on the lanes' threads (counted there)

    @property
    def first(self) -> ModelThread:
        return self._lanes[0]

    @property
    def running(self) -> bool:
        """True while a run is in progress on some lane's thread (also one nobody awaits any more)."""
        return self._in_threads > 0

    @property
    def free(self) -> int:
        """Lanes not held by anyone."""
        return len(self._free)

    @property
    def wide(self) -> bool:
        """True while a wide run is in progress: nothing else may start."""
        return self._wide

    async def changed(self) -> None:
        """Return at the next change: a run ended or a lane was freed."""
        self._changed.clear()
        await self._changed.wait()

    def take(self) -> ModelThread:
        """A free lane (the first, if it is free: it may run wide), held until :meth:`release`."""
        if not self._free:
            raise RuntimeError("no lane is free")
        lane = self.first if self.first in self._free else self._free[0]
        self._free.remove(lane)
        return lane

    def release(self, lane: ModelThread) -> None:
        self._free.append(lane)
        self._changed.set()

    async def call(self, lane: ModelThread, function: Callable[..., _T], *args: object, alone: bool = False) -> _T:
        """Run ``function(*args)`` on ``lane``: wide if it is the first lane, ``alone`` (nothing
        waits, says the caller) and no other run is in progress; else narrow. Waits for a wide run
        to end first."""
        while self._wide:
            await self.changed()
        wide = alone and self._running == 0 and self.count > 1 and lane is self.first
        width = self.threads if wide or self.count == 1 else self.narrow
        self._running += 1
        self._wide = wide
        try:
            return await lane.call(self._on_lane, width, function, *args)
        finally:
            self._running -= 1
            if wide:
                self._wide = False
            self._changed.set()

    def _on_lane(self, width: int, function: Callable[..., _T], *args: object) -> _T:
        with self._lock:
            self._in_threads += 1
        try:
            if self.count > 1:
                set_torch_threads(width)
            return function(*args)
        finally:
            with self._lock:
                self._in_threads -= 1

    def shutdown(self, wait: bool = True) -> None:
        """End every lane's thread (see :meth:`ModelThread.shutdown`)."""
        for lane in self._lanes:
            lane.shutdown(wait=wait)
