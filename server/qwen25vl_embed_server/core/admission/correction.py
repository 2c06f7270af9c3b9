"""Estimates that correct themselves: each admitted request's actual time to finish against the
wait predicted when it was admitted.

The work seconds that :mod:`~.wait_estimate` counts miss what the server does not measure per
request: other processes on the machine taking its cores, requests refused or cancelled part-way
after using the model, small requests run between a large one's pieces after it was admitted.
So each admitted request leaves a ratio, ``actual / predicted`` (the prediction at least
:data:`LEAST_PREDICTED_SECONDS`, so that a request predicted to take no time does not weigh as
infinitely late), and the last :data:`WINDOW` ratios give the correction: their
:data:`QUANTILE` quantile (a high one: most requests finish within the corrected estimate),
bounded to [:data:`LEAST_FACTOR`, :data:`MOST_FACTOR`], applied once :data:`LEAST_SAMPLES` ratios
were seen (1 until then).

A request that did not finish (its deadline passed, its caller went away, it failed) says only
that it took at least as long as it ran: its ratio counts when that is already over 1 (it was
late; its true ratio is higher still), and not otherwise (nothing is known).
"""

from __future__ import annotations

from collections import deque

WINDOW = 64
"""Recent ratios kept."""
QUANTILE = 0.97
"""The quantile of the ratios that scales predictions."""
LEAST_SAMPLES = 4
"""Ratios seen before the correction applies."""
LEAST_FACTOR, MOST_FACTOR = 0.5, 10.0
"""Bounds of the correction."""
LEAST_PREDICTED_SECONDS = 0.25
"""The least prediction a ratio divides by."""


class Correction:
    """Recent ``actual / predicted`` ratios and the factor they give. Change it on one thread."""

    def __init__(self, window: int = WINDOW, quantile: float = QUANTILE) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        self.quantile = quantile
        self._ratios: deque[float] = deque(maxlen=window)
        self._factor = 1.0

    @property
    def factor(self) -> float:
        """What predictions are multiplied by."""
        return self._factor

    @property
    def samples(self) -> int:
        return len(self._ratios)

    def observe(self, predicted: float, actual: float, finished: bool = True) -> None:
        """A request predicted (uncorrected) to take ``predicted`` seconds took ``actual``;
        ``finished`` False: it ended before finishing, ``actual`` is a lower bound."""
        ratio = actual / max(predicted, LEAST_PREDICTED_SECONDS)
        if not finished and ratio <= 1:
            return
        self._ratios.append(ratio)
        if len(self._ratios) < LEAST_SAMPLES:
            return
        ordered = sorted(self._ratios)
        high = ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]
        self._factor = min(MOST_FACTOR, max(LEAST_FACTOR, high))

    def clear(self) -> None:
        """Forget every ratio (factor 1)."""
        self._ratios.clear()
        self._factor = 1.0
