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
one exponentially weighted average of seconds per token and of tokens (each new measurement
weighs :data:`SMOOTHING`). A size not measured yet, within the measured ones, takes the nearest
smaller size's figure (below the smallest: the smallest's), an underestimate, as a request's
fixed costs weigh more per token the smaller it is. Above the largest measured size, the cost is
``linear * tokens + quadratic * tokens ** 2``, both terms at least 0, through the two largest
sizes (one size measured: linear only): a transformer's layers cost in proportion to the tokens,
its attention to their square, and attention's share grows with the size. (On the tiny test
model, from sizes of 5,592 and 11,192 tokens, a power law puts a 3584 x 3584 image, about 82,000
tokens, at about 44 s, this fit at about 80 s; it took 49 to 107 s.) Before any measurement the
cost is unknown; the server measures a few sizes as it starts (:mod:`~.calibration`), so that even
the first request of a size has a cost.

**The work ahead.** Every request counts from the moment it is estimated until its model run
ends (waiting for a budget, preprocessing, queued, running), at its size's cost (unknown: 0).
Two classes, as the batcher serves them: a request costing more than ``piece_tokens`` runs alone
and in pieces, and the small requests queued meanwhile run between two pieces. So a small request
waits for the small work ahead and at most one piece of the large; a large one waits for all of
it. Work seconds are the whole model's: however the lanes share it, the work ahead takes that long.

**The decision.** The estimated wait is ``(work ahead + the request's own cost) x correction``,
the correction a high quantile of recent requests' actual over predicted time to finish
(:mod:`~.correction`: what the work seconds miss, such as other processes on the machine, or
work the estimate does not count); a request
whose deadline is closer than that gets :class:`OverloadedError` (reason ``"deadline"``) with
``retry_after``: the time by which the work ahead should have shrunk enough for the same deadline
(none when the request alone takes longer than its deadline allows). A request whose cost is
unknown, or without a deadline, is never refused by it; nor is one of a size above the largest
measured with nothing ahead of it, however long its extrapolated cost: the fit is least sure there,
and its run measures the size (it still counts, at that cost, as work ahead of the next ones).
"""

from __future__ import annotations

from collections import Counter

from qwen25vl_embed_server.core.admission.correction import Correction
from qwen25vl_embed_server.core.errors import OverloadedError

SMOOTHING = 0.3
"""The weight of each new measurement in its size's average."""
SHORTEST_RETRY_SECONDS = 0.1
"""The least ``retry_after`` given: no retry hint shorter than this."""


class WaitEstimator:
    """The work in flight, the measured seconds per token by size, and the estimated wait of a
    new request. Change it on one thread (the pipeline's event loop); other threads may read it."""

    def __init__(self, piece_tokens: int, smoothing: float = SMOOTHING, correction: Correction | None = None) -> None:
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self.piece_tokens = piece_tokens
        self.smoothing = smoothing
        self.correction = correction if correction is not None else Correction()
        # By bit length of the tokens: seconds per token, and the tokens measured (averages).
        self._per_token: dict[int, float] = {}
        self._tokens: dict[int, float] = {}
        self._in_flight: Counter[int] = Counter()  # requests in flight by their tokens

    @property
    def requests(self) -> int:
        return self._in_flight.total()

    def is_large(self, tokens: int) -> bool:
        """Whether a request of ``tokens`` runs alone, in pieces (the batcher's rule)."""
        return 0 < self.piece_tokens < tokens

    def measured(self) -> dict[int, tuple[float, float]]:
        """The measured sizes: bit length -> (tokens, seconds) on average."""
        per_token, tokens = dict(self._per_token), dict(self._tokens)  # copies: the metrics read them
        return {size: (tokens[size], tokens[size] * per_token[size]) for size in sorted(per_token) if size in tokens}

    def cost(self, tokens: int) -> float | None:
        """Work seconds of a request of ``tokens`` (uncorrected): at its size's measured seconds per
        token, else the nearest smaller size's (the smallest's below it); above the largest size, the
        growth fitted on the two largest; None while nothing is measured."""
        sizes = self.measured()
        if not sizes:
            return None
        tokens = max(1, tokens)
        size = tokens.bit_length()
        largest = max(sizes)
        if size <= largest:
            known = [measured for measured in sizes if measured <= size] or [min(sizes)]
            measured_tokens, seconds = sizes[max(known)]
            return tokens * seconds / measured_tokens
        top, seconds = sizes[largest]
        linear, quadratic = seconds / top, 0.0
        if len(sizes) > 1:
            below, below_seconds = sizes[sorted(sizes)[-2]]
            if top > below:
                # cost = linear * t + quadratic * t**2 through both sizes, neither term negative.
                quadratic = max(0.0, (seconds / top - below_seconds / below) / (top - below))
                linear = max(0.0, seconds / top - quadratic * top)
        return tokens * (linear + quadratic * tokens)

    def extrapolated(self, tokens: int) -> bool:
        """Whether ``tokens`` is above the largest measured size (its cost extrapolated)."""
        sizes = self.measured()
        return bool(sizes) and max(1, tokens).bit_length() > max(sizes)

    def ahead(self, tokens: int) -> float:
        """Work seconds in flight that a new request of ``tokens`` waits for (uncorrected; 0 while
        nothing is measured)."""
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

    def predicted(self, tokens: int) -> float | None:
        """Uncorrected seconds until a request of ``tokens`` admitted now would finish; None while
        nothing is measured."""
        own = self.cost(tokens)
        if own is None:
            return None
        return self.ahead(tokens) + own

    def wait(self, tokens: int) -> float | None:
        """Seconds until a request of ``tokens`` admitted now would finish, corrected; None while
        nothing is measured."""
        predicted = self.predicted(tokens)
        return None if predicted is None else predicted * self.correction.factor

    def refusal(self, tokens: int, remaining: float | None) -> OverloadedError | None:
        """The refusal of a request of ``tokens`` whose deadline is ``remaining`` seconds away
        (None: no deadline), or None when it may be admitted."""
        wait = None if remaining is None else self.wait(tokens)
        if wait is None or remaining is None or wait <= remaining:
            return None
        alone = (self.cost(tokens) or 0.0) * self.correction.factor
        if alone >= wait and self.extrapolated(tokens):
            return None  # nothing ahead, a size never run: running it measures it
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
        if seconds is not None:
            self.record(tokens, seconds)

    def record(self, tokens: int, seconds: float) -> None:
        """A request of ``tokens`` took ``seconds`` of work (its size's averages take it in)."""
        if tokens < 1 or seconds <= 0:
            return
        size = tokens.bit_length()
        self._per_token[size] = self._averaged(self._per_token.get(size), seconds / tokens)
        self._tokens[size] = self._averaged(self._tokens.get(size), float(tokens))

    def forget(self, tokens: int | None = None) -> None:
        """Forget the measurements of the size of ``tokens`` (None: of every size; the work in
        flight stays)."""
        if tokens is None:
            self._per_token.clear()
            self._tokens.clear()
            return
        size = max(1, tokens).bit_length()
        self._per_token.pop(size, None)
        self._tokens.pop(size, None)

    def _averaged(self, before: float | None, sample: float) -> float:
        return sample if before is None else before + self.smoothing * (sample - before)
