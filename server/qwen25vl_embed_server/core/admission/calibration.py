"""Known costs from the start: before a server reports SERVING, it runs a few synthetic requests of
growing size, so that :mod:`~.wait_estimate` has measured sizes before the first real request.

The sizes: one square image of :data:`FIRST_SIDE` pixels a side (a first run warms the model's
kernels up and is forgotten), then the side grows by sqrt(2) (the tokens double, as a multiple of
:data:`SIDE_STEP`) while the last size took less than :data:`TARGET_SECONDS`, the next one's
tokens stay within the piece size (a request above it runs in pieces: the growth fitted on the two
largest sizes covers it), and the next size's runs (each predicted at :data:`GROWTH` times the
last) still end within ``budget`` seconds of the start (the warm-up and one size always run). Each
size runs :data:`REPEATS` times and the faster run counts: other processes on the machine slow a
run down now and then, and a size measured in such a moment would skew the fit. On a
shared 2-core CPU the tiny test model measures six sizes, up to about 11,000 tokens, in about 5 s; a
3B model's first size (470 tokens, about 1 TFLOP) takes seconds there, so it measures that one alone.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from qwen25vl_embed_server.core.admission.request import EncodedRequest
from qwen25vl_embed_server.core.admission.wait_estimate import WaitEstimator

FIRST_SIDE = 224
"""The first image's side in pixels (256 patches of 14 x 14)."""
SIDE_STEP = 28
"""Sides are multiples of this (a merged 2 x 2 group of 14-pixel patches)."""
log = logging.getLogger(__name__)

DEFAULT_CALIBRATION_SECONDS = 10.0
"""``serve --calibration-seconds``: the time the calibration may take, about."""
TARGET_SECONDS = 1.0
"""No larger size once a run took this long."""
GROWTH = 2.5
"""The next run's seconds, predicted from the last one's (tokens double; a little more than linear)."""
MOST_SIZES = 8
"""Sizes at most."""
REPEATS = 2
"""Runs of each size: the faster counts (a burst of other work on the machine slows one run, not both)."""


async def calibrate(
    run: Callable[[EncodedRequest], Awaitable[Any]],
    tokens_of: Callable[[EncodedRequest], int],
    waits: WaitEstimator,
    budget: float,
    clock: Callable[[], float] = time.monotonic,
) -> list[tuple[int, float]]:
    """Run the sizes above through ``run`` (which records what it measures in ``waits``),
    ``tokens_of`` giving each one's tokens; the warm-up's measurements are forgotten, and so are the
    corrections the runs made (each size was predicted from smaller ones only). Returns each
    counted run's tokens and seconds. ``budget`` 0: no run at all."""
    if budget <= 0:
        return []
    started = clock()
    side = FIRST_SIDE
    runs: list[tuple[int, float]] = []
    try:
        await run(synthetic_request(side))  # warm-up
        waits.forget()
        await _sizes(run, tokens_of, waits, budget, clock, started, runs)
    except Exception as error:  # e.g. a size over this server's limits: the sizes measured so far stay
        log.warning("calibration stopped after %d size(s): %s", len(runs), error)
    waits.correction.clear()
    measured = ", ".join(f"{tokens} tokens {seconds:.2f} s" for tokens, seconds in runs)
    log.info("calibrated the cost model in %.1f s: %s", clock() - started, measured or "no size")
    return runs


async def _sizes(
    run: Callable[[EncodedRequest], Awaitable[Any]],
    tokens_of: Callable[[EncodedRequest], int],
    waits: WaitEstimator,
    budget: float,
    clock: Callable[[], float],
    started: float,
    runs: list[tuple[int, float]],
) -> None:
    """Measure the sizes in turn, each one's tokens and seconds appended to ``runs``."""
    piece_tokens = waits.piece_tokens  # 0: no piece size, only the time bounds the sizes
    side = FIRST_SIDE
    while len(runs) < MOST_SIZES:
        request = synthetic_request(side)
        tokens = tokens_of(request)
        seconds, work = await _fastest(run, request, tokens, waits, clock)
        waits.forget(tokens)
        if work is not None:
            waits.record(tokens, work)
        runs.append((tokens, seconds))
        if seconds >= TARGET_SECONDS or clock() - started + GROWTH * REPEATS * seconds > budget:
            break
        if 0 < piece_tokens < 2 * tokens:
            break
        side = next_side(side)


async def _fastest(
    run: Callable[[EncodedRequest], Awaitable[Any]],
    request: EncodedRequest,
    tokens: int,
    waits: WaitEstimator,
    clock: Callable[[], float],
) -> tuple[float, float | None]:
    """The fewest seconds of :data:`REPEATS` runs of ``request``, and the fewest work seconds
    ``waits`` recorded for them (None: none recorded)."""
    seconds: list[float] = []
    work: list[float] = []
    for _ in range(REPEATS):
        waits.forget(tokens)
        began = clock()
        await run(request)
        seconds.append(clock() - began)
        measured = waits.measured().get(tokens.bit_length())
        if measured is not None:
            work.append(measured[1] * tokens / measured[0])
    return min(seconds), min(work, default=None)


def next_side(side: int) -> int:
    """The side whose square holds about twice the pixels, a multiple of :data:`SIDE_STEP`."""
    return max(side + SIDE_STEP, round(side * math.sqrt(2) / SIDE_STEP) * SIDE_STEP)


def synthetic_request(side: int) -> EncodedRequest:
    """One ``side`` x ``side`` image (a PNG of one colour: small to send, as costly to run as any) and
    the model's default outputs."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (120, 30, 200)).save(buffer, "PNG")
    return EncodedRequest(images=[buffer.getvalue()])
