"""How long a new request would take to finish, from the work admitted ahead of it and what the
server measured; a request whose deadline cannot be met is refused at once.

**What a request costs.** Each request that finishes is a measurement: its *work seconds*, in
seconds of the whole model (all of its threads): its preprocessing on one worker thread (that
thread's share of the model's threads), plus its share of its batch's model time by request count
(a run beside others on the model's lanes had a lane's share of the threads; a large request's
pieces are summed), over its tokens (:class:`~.request.Estimate`: vision
patches + LM sequence, from the images' headers). Seconds per token grow with a request's size
(the vision tower's full-attention blocks and the language model attend across a whole image
or sequence), so they are kept per size: requests whose tokens have the same bit length share
one exponentially weighted average (each new measurement weighs :data:`SMOOTHING`). A size not
measured yet takes the nearest smaller size's figure (an underestimate: no refusal of work that
would finish); with no smaller size measured, the request's cost is unknown.

**The work ahead.** Every request counts from the moment it is estimated until its model run
ends (waiting for a budget, preprocessing, queued, running), at its size's cost (unknown: 0).
Two classes, as the batcher serves them: a request costing more than ``piece_tokens`` runs alone
and in pieces, and the small requests queued meanwhile run between two pieces. So a small request
waits for the small work ahead and at most one piece of the large; a large one waits for all of
it. Work seconds are the whole model's: however the lanes share it, the work ahead takes that long.

**The decision.** The estimated wait is ``work ahead + the request's own cost``; a request
whose deadline is closer than that gets :class:`OverloadedError` (reason ``"deadline"``) with
``retry_after``: the time by which the work ahead should have shrunk enough for the same deadline
(none when the request alone takes longer than its deadline allows). A request whose cost is
unknown, or without a deadline, is never refused by it.
"""

from __future__ import annotations

from collections import Counter

from qwen25vl_embed_server.core.errors import OverloadedError

SMOOTHING = 0.3
"""The weight of each new measurement in its size's average."""
SHORTEST_RETRY_SECONDS = 0.1
"""The least ``retry_after`` given: no retry hint shorter than this."""


class WaitEstimator:
    """The work in flight, the measured seconds per token by size, and the estimated wait of a
    new request. Change it on one thread (the pipeline's event loop); other threads may read it."""

    def __init__(self, piece_tokens: int, smoothing: float = SMOOTHING) -> None:
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self.piece_tokens = piece_tokens
        self.smoothing = smoothing
        self._per_token: dict[int, float] = {}  # seconds per token by bit length of the tokens
        self._in_flight: Counter[int] = Counter()  # requests in flight by their tokens

    @property
    def requests(self) -> int:
        return self._in_flight.total()

    def is_large(self, tokens: int) -> bool:
        """Whether a request of ``tokens`` runs alone, in pieces (the batcher's rule)."""
        return 0 < self.piece_tokens < tokens

    def cost(self, tokens: int) -> float | None:
        """Work seconds of a request of ``tokens``: at its size's measured seconds per token, else
        the nearest smaller size's; None when no size up to its own is measured."""
        size = max(1, tokens).bit_length()
        per_token = dict(self._per_token)  # a copy: the metrics read it from another thread
        known = [measured for measured in per_token if measured <= size]
        if not known:
            return None
        return tokens * per_token[max(known)]

    def ahead(self, tokens: int) -> float:
        """Work seconds in flight that a new request of ``tokens`` waits for (sizes not measured: 0)."""
        small = large = 0.0
        for amount, count in list(self._in_flight.items()):  # a copy, as in cost()
            seconds = (self.cost(amount) or 0.0) * count
            if self.is_large(amount):
                large += seconds
            else:
                small += seconds
        if self.is_large(tokens) or self.piece_tokens == 0:
            return small + large
        return small + min(large, self.cost(self.piece_tokens) or 0.0)

    def wait(self, tokens: int) -> float | None:
        """Seconds until a request of ``tokens`` admitted now would finish; None while its cost is unknown."""
        own = self.cost(tokens)
        if own is None:
            return None
        return self.ahead(tokens) + own

    def refusal(self, tokens: int, remaining: float | None) -> OverloadedError | None:
        """The refusal of a request of ``tokens`` whose deadline is ``remaining`` seconds away
        (None: no deadline), or None when it may be admitted."""
        wait = None if remaining is None else self.wait(tokens)
        if wait is None or remaining is None or wait <= remaining:
            return None
        alone = self.cost(tokens) or 0.0
        if alone > remaining:
            return OverloadedError(
                f"the request ({tokens} tokens) takes about {alone:.1f} s on this server, more than its deadline "
                f"({remaining:.1f} s) allows; retry with a longer deadline or a smaller request",
                reason="deadline",
            )
        return OverloadedError(
            f"the work ahead would keep this request ({tokens} tokens) about {wait:.1f} s, past its deadline "
            f"({remaining:.1f} s); retry later or elsewhere",
            reason="deadline",
            retry_after=max(SHORTEST_RETRY_SECONDS, wait - remaining),
        )

    def started(self, tokens: int) -> None:
        """A request of ``tokens`` was admitted: it is work ahead of the next ones."""
        self._in_flight[tokens] += 1

    def finished(self, tokens: int, seconds: float | None) -> None:
        """A request of ``tokens`` left; ``seconds``: its work seconds, when it finished its model
        run (a measurement), else None."""
        self._in_flight[tokens] -= 1
        if self._in_flight[tokens] <= 0:
            del self._in_flight[tokens]
        if seconds is None or tokens < 1 or seconds <= 0:
            return
        size = tokens.bit_length()
        sample = seconds / tokens
        before = self._per_token.get(size)
        self._per_token[size] = sample if before is None else before + self.smoothing * (sample - before)
