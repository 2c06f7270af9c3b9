"""A server-wide budget of some resource (tokens in flight, decoded pixels, result bytes held),
shared by the requests of one event loop.

A request takes its amount before the stage that needs it and gives it back after; while the
budget is spent, requests wait. The budget is never exceeded: ``used <= capacity`` at all times
(``peak`` records the most in use at once, for tests and metrics).

Two classes, so that a large request waiting does not block the small ones behind it (head-of-line
blocking) and a stream of small ones does not starve a large one:

- **large**: an amount above ``capacity // 8``. At the default 262,144 tokens in flight that is
  above 32,768 tokens, a whole batch on an accelerator (``--batch-max-tokens``): a request that
  alone fills a batch anywhere.
  Large requests are admitted in arrival order among themselves, and all of them together hold at
  most ``capacity - reserve``; an amount above that is taken as ``capacity - reserve``, so such a
  request runs alone among the large ones (per-request caps refuse what must never run).
- **small**: the rest, also in arrival order among themselves. While no large request waits they
  may use the whole budget. While one waits, new small ones are admitted only as long as the small
  ones together hold at most ``reserve`` (``2 * (capacity // 8)``, about a quarter: two full
  batches of small requests, one running and one being prepared, at the default), so the large
  one gets its room once the small ones above the reserve finish, and the small ones are never
  blocked by it. Below a capacity of 8 the reserve is 0: every amount is large, plain FIFO.

Since the large ones never hold more than ``capacity - reserve``, a small one admitted within the
reserve always fits in the whole budget, and a large one within its room always fits beside small
ones within the reserve: neither class waits for requests of the other that arrived after it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from qwen25vl_embed_server.core.errors import DeadlineExceededError

Waiter = tuple[int, asyncio.Future[None]]


class Budget:
    """``capacity`` units of one resource, named ``what`` in errors (e.g. "tokens in flight")."""

    def __init__(self, capacity: int, what: str) -> None:
        if capacity < 1:
            raise ValueError(f"{what}: the budget must be at least 1, got {capacity}")
        self.capacity = capacity
        self.what = what
        self.large_above = capacity // 8
        self.reserve = 2 * self.large_above  # two of the largest small amounts; 0 below 8: plain FIFO
        self.used = 0
        self.used_large = 0
        self.peak = 0
        self._small: deque[Waiter] = deque()
        self._large: deque[Waiter] = deque()

    @property
    def waiting(self) -> int:
        return len(self._small) + len(self._large)

    def share(self, amount: int) -> int:
        """What a request of ``amount`` takes: a large one at most ``capacity - reserve``."""
        amount = max(0, amount)
        return min(amount, self.capacity - self.reserve) if self.is_large(amount) else amount

    def is_large(self, amount: int) -> bool:
        """Whether ``amount`` (asked for, or as taken) is in the large class; a clamped large
        amount is still large, since ``capacity - reserve > large_above``."""
        return amount > self.large_above

    async def acquire(self, amount: int, deadline: float | None = None) -> int:
        """Wait until ``amount`` (clamped by :meth:`share`) may be taken, take it and return it
        (give that back with :meth:`release`).

        Raises:
            DeadlineExceededError: ``deadline`` (``time.monotonic()``) passed while waiting.
        """
        amount = self.share(amount)
        line = self._large if self.is_large(amount) else self._small
        if not line and self._fits(amount):
            self._take(amount)
            return amount
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (amount, granted)
        line.append(entry)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            await asyncio.wait_for(asyncio.shield(granted), timeout)
        except BaseException as error:  # timeout or cancellation: leave the line
            if granted.done() and not granted.cancelled():
                self.release(amount)  # granted just as we gave up
            else:
                granted.cancel()
                line.remove(entry)
                self._wake()  # those behind may fit now, and small ones may use more
            if isinstance(error, TimeoutError):
                raise DeadlineExceededError(f"the deadline passed while waiting for {self.what}") from None
            raise
        return amount

    def release(self, amount: int) -> None:
        self.used -= amount
        if self.is_large(amount):
            self.used_large -= amount
        self._wake()

    def _fits(self, amount: int) -> bool:
        if self.used + amount > self.capacity:
            return False
        if self.is_large(amount):
            return self.used_large + amount <= self.capacity - self.reserve
        # A small one beside a waiting large one stays within the reserve.
        return not self._large or (self.used - self.used_large) + amount <= self.reserve

    def _take(self, amount: int) -> None:
        self.used += amount
        if self.is_large(amount):
            self.used_large += amount
        self.peak = max(self.peak, self.used)

    def _wake(self) -> None:
        # Large ones first: admitting one may empty their line, which lets small ones use more.
        for line in (self._large, self._small):
            while line and self._fits(line[0][0]):
                amount, granted = line.popleft()
                self._take(amount)
                granted.set_result(None)
