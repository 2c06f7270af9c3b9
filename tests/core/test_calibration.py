"""The calibration a server runs before it reports SERVING, on a made-up model: a fake run that
measures what a cost formula says and moves a fake clock. The sizes double from the first, the
warm-up is forgotten, and the runs stop at the target time, at the piece size or at the budget;
after it, a size far above the largest run has a cost near the formula's. No torch, no model, no
wall-clock timing."""

from __future__ import annotations

import asyncio
import io
import itertools

import pytest
from PIL import Image

from qwen25vl_embed_server.core.admission import calibration
from qwen25vl_embed_server.core.admission.calibration import FIRST_SIDE, TARGET_SECONDS, calibrate, next_side
from qwen25vl_embed_server.core.admission.request import EncodedRequest
from qwen25vl_embed_server.core.admission.wait_estimate import WaitEstimator
from qwen25vl_embed_server.core.errors import LimitExceededError

PATCH = 14


class FakeModel:
    """Runs a request in ``linear * tokens + quadratic * tokens**2`` seconds of a fake clock
    (``warm_up`` seconds more the first time, ``spike`` more in the runs numbered in ``spikes``,
    from 0) and records it in ``waits``, as the pipeline does."""

    def __init__(
        self,
        waits: WaitEstimator,
        linear: float,
        quadratic: float = 0.0,
        warm_up: float = 0.0,
        spikes: frozenset[int] = frozenset(),
        spike: float = 0.0,
        most_tokens: int | None = None,
    ) -> None:
        self.most_tokens = most_tokens
        self.waits, self.linear, self.quadratic, self.warm_up = waits, linear, quadratic, warm_up
        self.spikes, self.spike = spikes, spike
        self.now = 0.0
        self.sides: list[int] = []

    def tokens_of(self, request: EncodedRequest) -> int:
        width, height = Image.open(io.BytesIO(request.images[0])).size
        return (width // PATCH) * (height // PATCH)

    def seconds(self, tokens: int) -> float:
        return self.linear * tokens + self.quadratic * tokens**2

    async def run(self, request: EncodedRequest) -> None:
        tokens = self.tokens_of(request)
        if self.most_tokens is not None and tokens > self.most_tokens:
            raise LimitExceededError("max_request_tokens", f"request costs {tokens} tokens")
        self.sides.append(Image.open(io.BytesIO(request.images[0])).size[0])
        seconds = self.seconds(tokens) + (self.warm_up if len(self.sides) == 1 else 0.0)
        seconds += self.spike if len(self.sides) - 1 in self.spikes else 0.0
        self.now += seconds
        self.waits.started(tokens)
        self.waits.finished(tokens, seconds)

    def calibrate(self, budget: float) -> list[tuple[int, float]]:
        return asyncio.run(calibrate(self.run, self.tokens_of, self.waits, budget, clock=lambda: self.now))


def test_sizes_double_until_a_run_takes_the_target_time_the_warm_up_forgotten() -> None:
    waits = WaitEstimator(piece_tokens=1_000_000)
    waits.correction.observe(1.0, 5.0)
    model = FakeModel(waits, linear=1e-4, warm_up=30.0)  # 10,000 tokens a second
    runs = model.calibrate(budget=60.0)
    second = next_side(FIRST_SIDE)
    assert model.sides[:5] == [FIRST_SIDE, FIRST_SIDE, FIRST_SIDE, second, second]  # the warm-up, then each size twice
    tokens = [amount for amount, _ in runs]
    for smaller, larger in itertools.pairwise(tokens):
        assert 1.8 < larger / smaller < 2.2  # about twice the tokens each time
    assert runs[-1][1] >= TARGET_SECONDS > runs[-2][1]  # the last one took the target time
    assert [seconds for _, seconds in runs] == pytest.approx([model.seconds(amount) for amount in tokens])
    # The warm-up's 30 s are forgotten; the sizes' costs are as measured, and so is the correction.
    assert waits.cost(tokens[0]) == pytest.approx(model.seconds(tokens[0]))
    assert waits.correction.samples == 0


def test_the_cost_far_above_the_runs_follows_the_growth_they_showed() -> None:
    waits = WaitEstimator(piece_tokens=1_000_000)
    model = FakeModel(waits, linear=1e-4, quadratic=1e-9)  # attention's share grows with the size
    runs = model.calibrate(budget=60.0)
    largest = runs[-1][0]
    far = 16 * largest
    estimate = waits.cost(far)
    assert estimate is not None
    # Within the share of the nearest-smaller rounding (one size's tokens average), never below linear.
    assert model.seconds(far) * 0.8 < estimate < model.seconds(far) * 1.25
    assert estimate > far * runs[-1][1] / largest


def test_the_runs_stop_at_the_piece_size_and_within_the_budget() -> None:
    waits = WaitEstimator(piece_tokens=2000)
    model = FakeModel(waits, linear=1e-6)  # fast: only the piece size stops it
    runs = model.calibrate(budget=60.0)
    assert runs[-1][0] <= 2000 < 2 * runs[-1][0]
    slow = FakeModel(WaitEstimator(piece_tokens=1_000_000), linear=1e-3)  # 256 tokens: 0.26 s
    runs = slow.calibrate(budget=1.0)
    assert len(runs) == 1  # the next run (predicted 2.5 x 0.26 s) would end past the budget
    assert slow.now <= 1.0
    none = FakeModel(WaitEstimator(piece_tokens=0), linear=1e-3)
    assert none.calibrate(budget=0.0) == []
    assert none.sides == []
    assert none.waits.cost(100) is None


def test_synthetic_requests_are_squares_of_the_side_asked() -> None:
    request = calibration.synthetic_request(448)
    assert Image.open(io.BytesIO(request.images[0])).size == (448, 448)
    assert request.outputs == ()  # the model's defaults
    assert next_side(FIRST_SIDE) == 308  # 224 x sqrt(2) = 316.8, a multiple of 28
    assert next_side(28) == 56


def test_a_run_slowed_by_other_work_does_not_count_the_other_run_of_its_size_does() -> None:
    waits = WaitEstimator(piece_tokens=1_000_000)
    # Runs 1 and 4 (the first of the first size, the second of the second) take 0.5 s more.
    model = FakeModel(waits, linear=1e-4, quadratic=1e-9, spikes=frozenset({1, 4}), spike=0.5)
    runs = model.calibrate(budget=60.0)
    assert len(runs) >= 3
    for tokens, seconds in runs:
        assert seconds == pytest.approx(model.seconds(tokens))
    for tokens, _ in runs[-3:]:  # (the first two sizes, 256 and 484 tokens, share a bit length)
        assert waits.cost(tokens) == pytest.approx(model.seconds(tokens))


def test_a_size_the_server_refuses_ends_the_calibration_the_sizes_before_it_stay() -> None:
    waits = WaitEstimator(piece_tokens=1_000_000)
    model = FakeModel(waits, linear=1e-5, most_tokens=1500)  # 1,024 tokens pass, 2,116 are over the limit
    runs = model.calibrate(budget=60.0)
    assert [tokens for tokens, _ in runs] == [256, 484, 1024]
    assert waits.cost(1024) == pytest.approx(model.seconds(1024))
    refused = FakeModel(WaitEstimator(piece_tokens=0), linear=1e-5, most_tokens=100)  # even the warm-up
    assert refused.calibrate(budget=60.0) == []
    assert refused.waits.cost(100) is None
