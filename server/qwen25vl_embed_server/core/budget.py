"""A server-wide budget of some resource (tokens in flight, decoded pixels, result bytes held),
shared by the requests of one event loop.

A request takes its amount before the stage that needs it and gives it back after; while the
budget is spent, requests wait in arrival order (first come, first served: a large request is not
overtaken for ever by small ones). An amount above the whole budget is taken as the whole budget:
such a request runs alone (per-request caps refuse what must never run). The budget is only ever
exceeded by nothing: ``peak`` records the most in use at once, for tests and metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from qwen25vl_embed_server.core.errors import DeadlineExceededError


class Budget:
    """``capacity`` units of one resource, named ``what`` in errors (e.g. "tokens in flight")."""

    def __init__(self, capacity: int, what: str) -> None:
        if capacity < 1:
            raise ValueError(f"{what}: the budget must be at least 1, got {capacity}")
        self.capacity = capacity
        self.what = what
        self.used = 0
        self.peak = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def share(self, amount: int) -> int:
        """What a request of ``amount`` takes: at most the whole budget."""
        return max(0, min(amount, self.capacity))

    async def acquire(self, amount: int, deadline: float | None = None) -> int:
        """Wait until ``amount`` (clamped by :meth:`share`) is free, take it and return it (give
        that back with :meth:`release`).

        Raises:
            DeadlineExceededError: ``deadline`` (``time.monotonic()``) passed while waiting.
        """
        amount = self.share(amount)
        if not self._waiters and self.used + amount <= self.capacity:
            self._take(amount)
            return amount
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (amount, granted)
        self._waiters.append(entry)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            await asyncio.wait_for(asyncio.shield(granted), timeout)
        except BaseException as error:  # timeout or cancellation: leave the line
            if granted.done() and not granted.cancelled():
                self.release(amount)  # granted just as we gave up
            else:
                granted.cancel()
                self._waiters.remove(entry)
                self._wake()  # those behind may fit now
            if isinstance(error, TimeoutError):
                raise DeadlineExceededError(f"the deadline passed while waiting for {self.what}") from None
            raise
        return amount

    def release(self, amount: int) -> None:
        self.used -= amount
        self._wake()

    def _take(self, amount: int) -> None:
        self.used += amount
        self.peak = max(self.peak, self.used)

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            amount, granted = self._waiters.popleft()
            self._take(amount)
            granted.set_result(None)
