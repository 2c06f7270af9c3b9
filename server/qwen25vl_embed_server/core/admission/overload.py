"""The pipeline's early refusals: work that cannot finish in time, or that memory cannot hold, is
refused at once with :class:`OverloadedError` (its ``reason`` and, where the server can tell,
``retry_after``), instead of waiting. Counted by reason for the metrics.

- ``deadline``: the work ahead would keep the request past its deadline (:mod:`~.wait_estimate`;
  no ``retry_after`` when the request alone takes longer than its deadline);
- ``memory``: the request messages in flight would exceed their budget (retry later), or the
  request alone is more than the memory limit lets one request hold (no ``retry_after``: it never
  will fit);
- ``queue``: the requests in flight or the batching queue are at their bound.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from qwen25vl_embed_server.core.admission.wait_estimate import SHORTEST_RETRY_SECONDS, WaitEstimator
from qwen25vl_embed_server.core.errors import OverloadedError

REASONS = ("deadline", "queue", "memory")
UNKNOWN_RETRY_SECONDS = 1.0
"""The retry hint of a refusal that will pass later, while nothing measured says when."""


@dataclass(frozen=True)
class Admitted:
    """A request admitted past the deadline check: its tokens, the wait predicted then
    (uncorrected; None while nothing was measured) and when (the admission's clock)."""

    tokens: int
    predicted: float | None
    at: float


class Admission:
    """Early refusals of one pipeline; use it on the pipeline's event loop.

    ``piece_tokens``: the batcher's piece size (a request costing more runs in pieces).
    ``request_bytes``: the budget of request bytes in flight (None: no bound). ``clock``:
    ``time.monotonic`` (tests give a fake).
    """

    def __init__(
        self,
        piece_tokens: int,
        request_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.waits = WaitEstimator(piece_tokens)
        self.request_bytes = request_bytes
        self.request_bytes_used = 0
        self.refusals: Counter[str] = Counter(dict.fromkeys(REASONS, 0))
        self._clock = clock

    def refused(self, error: OverloadedError) -> None:
        """Count a refusal (from here, or from elsewhere in the pipeline: the batcher's queue)."""
        self.refusals[error.reason] += 1

    def estimated_wait(self) -> float:
        """Seconds a small request arriving now would wait for the work ahead of it (sizes not
        measured yet count 0)."""
        return self.waits.ahead(1) * self.waits.correction.factor

    def retry_after(self) -> float | None:
        """When a place in flight should be free: the work in flight, shared by the requests in
        flight (None while none of it is measured)."""
        waits = self.waits
        ahead = waits.ahead(waits.piece_tokens + 1) * waits.correction.factor  # all of it
        if ahead <= 0:
            return None
        return max(SHORTEST_RETRY_SECONDS, ahead / max(1, waits.requests))

    def check_deadline(self, tokens: int, deadline: float | None) -> None:
        """Raise :class:`OverloadedError` (``deadline``) when a request of ``tokens`` admitted now
        would not finish by ``deadline`` (``time.monotonic()``; None: no deadline, never refused)."""
        remaining = None if deadline is None else deadline - self._clock()
        refusal = self.waits.refusal(tokens, remaining)
        if refusal is not None:
            raise refusal

    def admit(self, tokens: int, deadline: float | None) -> Admitted:
        """:meth:`check_deadline`, then count the request as work ahead of the next ones until
        :meth:`left`."""
        now = self._clock()
        refusal = self.waits.refusal(tokens, None if deadline is None else deadline - now)
        if refusal is not None:
            raise refusal
        predicted = self.waits.predicted(tokens)
        self.waits.started(tokens)
        return Admitted(tokens, predicted, now)

    def left(self, admitted: Admitted, work_seconds: float | None) -> None:
        """An admitted request left: ``work_seconds`` its measured work when its model run finished
        (see :mod:`~.wait_estimate`), None when it did not; its time against the prediction
        corrects the next ones (:mod:`~.correction`)."""
        self.waits.finished(admitted.tokens, work_seconds)
        if admitted.predicted is not None:
            actual = self._clock() - admitted.at
            self.waits.correction.observe(admitted.predicted, actual, finished=work_seconds is not None)

    def take_bytes(self, size: int) -> None:
        """Count ``size`` request bytes in flight, or raise :class:`OverloadedError` (``memory``)
        when they would exceed the budget (a request alone over it is taken when nothing else is
        in flight: the transport's size limit bounds it)."""
        budget = self.request_bytes
        if budget is not None and self.request_bytes_used and self.request_bytes_used + size > budget:
            raise OverloadedError(
                f"the server holds {self.request_bytes_used} bytes of requests, and this one's {size} would exceed "
                f"what its memory limit allows ({budget}); retry later",
                reason="memory",
                retry_after=self.retry_after() or UNKNOWN_RETRY_SECONDS,
            )
        self.request_bytes_used += size

    def give_bytes(self, size: int) -> None:
        self.request_bytes_used -= size
