"""The wait estimator and the early refusals on made-up measurements: seconds per token by request
size, the work ahead by class and lane, the refusal of a request whose deadline cannot be met (with
its retry hint), and the request-bytes budget. No torch, no model, no wall-clock timing."""

from __future__ import annotations

import pytest

from qwen25vl_embed_server.core.admission.correction import (
    LEAST_FACTOR,
    LEAST_PREDICTED_SECONDS,
    LEAST_SAMPLES,
    MOST_FACTOR,
    Correction,
)
from qwen25vl_embed_server.core.admission.overload import UNKNOWN_RETRY_SECONDS, Admission
from qwen25vl_embed_server.core.admission.wait_estimate import SHORTEST_RETRY_SECONDS, WaitEstimator
from qwen25vl_embed_server.core.errors import OverloadedError


def test_nothing_is_refused_until_a_size_is_measured() -> None:
    waits = WaitEstimator(piece_tokens=100)
    waits.started(50)
    assert waits.cost(50) is None
    assert waits.wait(10) is None
    assert waits.refusal(10_000, remaining=0.001) is None  # unknown cost: admitted
    waits.finished(50, None)  # failed or cancelled: no measurement
    assert waits.cost(50) is None
    assert waits.requests == 0
    waits.started(1000)
    waits.finished(1000, 10.0)  # 0.01 s per token at 1,000 tokens (bit length 10)
    assert waits.cost(1000) == pytest.approx(10.0)
    assert waits.cost(600) == pytest.approx(6.0)  # same bit length
    assert waits.cost(50) == pytest.approx(0.5)  # below the smallest size: the smallest's figure
    assert waits.cost(100_000) == pytest.approx(1000.0)  # one size measured: linear above it


def test_each_size_keeps_its_own_average_recent_measurements_weighing_more() -> None:
    waits = WaitEstimator(piece_tokens=100, smoothing=0.5)
    for seconds in (1.0, 3.0):
        waits.started(10)
        waits.finished(10, seconds)
    assert waits.cost(10) == pytest.approx(2.0)  # 1 + 0.5 x (3 - 1)
    waits.started(4000)
    waits.finished(4000, 400.0)  # 0.1 s per token at 4,000 tokens
    assert waits.cost(10) == pytest.approx(2.0)  # untouched
    assert waits.cost(4000) == pytest.approx(400.0)
    assert waits.cost(3000) == pytest.approx(300.0)  # bit length 12, as 4,000


def test_a_small_request_waits_for_the_small_work_and_one_piece_a_large_one_for_all() -> None:
    waits = WaitEstimator(piece_tokens=100)
    for tokens, seconds in ((20, 2.0), (100, 10.0), (1000, 100.0)):  # 0.1 s per token at every size
        waits.started(tokens)
        waits.finished(tokens, seconds)
    for tokens in (1000, 1000, 30, 20):  # two large, two small in flight
        waits.started(tokens)
    assert waits.ahead(40) == pytest.approx(5.0 + 10.0)  # the small ones and one piece
    assert waits.ahead(500) == pytest.approx(205.0)  # everything
    assert waits.wait(40) == pytest.approx(15.0 + 4.0)
    assert waits.wait(500) == pytest.approx(205.0 + 50.0)
    unsplit = WaitEstimator(0)  # no pieces: a small request waits for everything too
    unsplit.started(1000)
    unsplit.finished(1000, 100.0)
    unsplit.started(1000)
    unsplit.started(10)
    assert unsplit.ahead(10) == pytest.approx(100.0 + 1.0)  # (10 tokens: at the 1,000-token size's figure)


def test_refused_when_the_deadline_is_closer_than_the_wait_with_a_retry_hint() -> None:
    waits = WaitEstimator(piece_tokens=100)
    for tokens in (50, 1000):
        waits.started(tokens)
        waits.finished(tokens, tokens * 0.1)  # 0.1 s per token
    for _ in range(5):
        waits.started(1000)  # 500 s of large work ahead
    # A large request of 1,000 tokens: 500 + 100 = 600 s.
    assert waits.refusal(1000, remaining=600.5) is None
    refused = waits.refusal(1000, remaining=150.0)
    assert refused is not None
    assert refused.reason == "deadline"
    assert refused.retry_after == pytest.approx(600 - 150)
    assert "past its deadline" in str(refused)
    # A small request waits for one piece only: 100 tokens x 0.1 + its own 5 s = 15 s.
    assert waits.refusal(50, remaining=16.0) is None
    small = waits.refusal(50, remaining=14.0)
    assert small is not None
    assert small.retry_after == pytest.approx(1.0)
    assert waits.refusal(50, remaining=None) is None  # no deadline: never refused by it


def test_a_request_longer_than_its_deadline_alone_gets_no_retry_hint() -> None:
    waits = WaitEstimator(piece_tokens=100)
    waits.started(10)
    waits.finished(10, 1.0)  # 0.1 s per token
    refused = waits.refusal(15, remaining=1.0)  # 1.5 s alone
    assert refused is not None
    assert refused.reason == "deadline"
    assert refused.retry_after is None
    assert "longer deadline" in str(refused)


def test_the_retry_hint_has_a_floor() -> None:
    waits = WaitEstimator(piece_tokens=100)
    waits.started(50)
    waits.finished(50, 0.05)
    waits.started(50)
    refused = waits.refusal(50, remaining=0.09)  # wait 0.1 s, 0.01 s past
    assert refused is not None
    assert refused.retry_after == SHORTEST_RETRY_SECONDS


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="smoothing"):
        WaitEstimator(100, smoothing=0)


def test_admission_refuses_past_the_deadline_and_counts_the_reason() -> None:
    now = [100.0]
    admission = Admission(piece_tokens=100, clock=lambda: now[0])
    admission.waits.started(50)
    admission.waits.finished(50, 5.0)  # 0.1 s per token
    for _ in range(3):
        admission.waits.started(50)  # 15 s of small work ahead
    admission.check_deadline(50, deadline=now[0] + 21.0)  # 15 + 5 = 20 s: admitted
    admission.check_deadline(50, deadline=None)
    with pytest.raises(OverloadedError) as refused:
        admission.check_deadline(50, deadline=now[0] + 19.0)
    assert refused.value.reason == "deadline"
    assert refused.value.retry_after == pytest.approx(1.0)
    admission.refused(refused.value)
    assert admission.refusals == {"deadline": 1, "queue": 0, "memory": 0}
    assert admission.estimated_wait() == pytest.approx(15.0)
    assert admission.retry_after() == pytest.approx(15.0 / 3)  # a place frees every 5 s


def test_the_request_bytes_budget_refuses_at_once_and_a_lone_large_request_passes() -> None:
    admission = Admission(piece_tokens=100, request_bytes=1000)
    admission.take_bytes(1500)  # alone: the transport's size limit bounds it
    admission.give_bytes(1500)
    admission.take_bytes(600)
    admission.take_bytes(400)
    with pytest.raises(OverloadedError) as refused:
        admission.take_bytes(1)
    assert refused.value.reason == "memory"
    assert refused.value.retry_after == UNKNOWN_RETRY_SECONDS  # nothing measured: a fixed hint
    admission.give_bytes(400)
    admission.take_bytes(300)
    assert admission.request_bytes_used == 900


def _measure(waits: WaitEstimator, tokens: int, seconds: float) -> None:
    waits.started(tokens)
    waits.finished(tokens, seconds)


def test_above_the_largest_size_the_cost_grows_as_fitted_on_the_two_largest() -> None:
    waits = WaitEstimator(piece_tokens=0)
    for tokens in (250, 1000, 2000):  # 1e-3 s a token + 1e-6 s a token squared
        _measure(waits, tokens, 1e-3 * tokens + 1e-6 * tokens**2)
    assert waits.cost(8000) == pytest.approx(8.0 + 64.0)  # the linear and the quadratic term, as measured
    assert waits.cost(2000) == pytest.approx(6.0)
    assert waits.cost(400) == pytest.approx(400 * 1.25e-3)  # not measured (bit length 9): the 250-token size's figure
    falling = WaitEstimator(piece_tokens=0)
    _measure(falling, 1000, 2.0)  # fixed costs: fewer seconds a token at the larger size
    _measure(falling, 2000, 3.0)
    assert falling.cost(8000) == pytest.approx(8000 * 3.0 / 2000)  # at least linear: never below the largest's figure


def _correct(admission: Admission, now: list[float], ratio: float, times: int) -> None:
    """``times`` requests of 50 tokens, each admitted alone and taking ``ratio`` x its prediction."""
    for _ in range(times):
        admitted = admission.admit(50, deadline=None)
        assert admitted.predicted is not None
        now[0] += ratio * admitted.predicted
        admission.left(admitted, work_seconds=5.0)  # finished, its work as measured before: the costs stay


def test_actual_times_over_the_prediction_make_the_next_predictions_longer() -> None:
    now = [0.0]
    admission = Admission(piece_tokens=100, clock=lambda: now[0])
    _measure(admission.waits, 50, 5.0)  # 0.1 s a token: a 50-token request alone takes 5 s
    admission.waits.started(50)  # 5 s ahead: a new one 10 s
    admission.check_deadline(50, deadline=now[0] + 12.0)  # admitted
    admission.waits.finished(50, None)
    _correct(admission, now, 2.0, times=10)  # each took twice its prediction: 10 s
    assert admission.waits.correction.factor == pytest.approx(2.0)
    admission.waits.started(50)
    with pytest.raises(OverloadedError) as refused:
        admission.check_deadline(50, deadline=now[0] + 12.0)  # now 20 s
    assert refused.value.reason == "deadline"
    assert refused.value.retry_after == pytest.approx(20.0 - 12.0)
    assert admission.estimated_wait() == pytest.approx(2 * 5.0)


def test_actual_times_under_the_prediction_make_the_next_predictions_shorter() -> None:
    now = [0.0]
    admission = Admission(piece_tokens=100, clock=lambda: now[0])
    _measure(admission.waits, 50, 5.0)
    admission.waits.started(50)
    with pytest.raises(OverloadedError):
        admission.check_deadline(50, deadline=now[0] + 8.0)  # 10 s predicted
    admission.waits.finished(50, None)
    _correct(admission, now, 0.5, times=10)  # each took half its prediction
    assert admission.waits.correction.factor == pytest.approx(0.5)
    admission.waits.started(50)
    admission.check_deadline(50, deadline=now[0] + 8.0)  # 5 s now: admitted


def test_the_correction_is_a_high_quantile_of_recent_ratios_bounded() -> None:
    correction = Correction(window=10, quantile=0.9)
    for _ in range(LEAST_SAMPLES - 1):
        correction.observe(predicted=1.0, actual=3.0)
    assert correction.factor == 1.0  # too few ratios yet
    correction.observe(predicted=1.0, actual=3.0)
    assert correction.factor == pytest.approx(3.0)
    for _ in range(10):  # the window: only the last 10 count
        correction.observe(predicted=2.0, actual=2.0)
    assert correction.factor == pytest.approx(1.0)
    for _ in range(2):  # one in ten slower does not move the 0.9 quantile; two do
        correction.observe(predicted=1.0, actual=4.0)
    assert correction.factor == pytest.approx(4.0)
    correction.observe(predicted=1.0, actual=1000.0)
    for _ in range(10):
        correction.observe(predicted=1.0, actual=1000.0)
    assert correction.factor == MOST_FACTOR
    for _ in range(10):
        correction.observe(predicted=4.0, actual=0.1)
    assert correction.factor == LEAST_FACTOR
    # A prediction of almost nothing does not weigh as infinitely late.
    correction.clear()
    for _ in range(LEAST_SAMPLES):
        correction.observe(predicted=0.0, actual=LEAST_PREDICTED_SECONDS * 2)
    assert correction.factor == pytest.approx(2.0)


def test_a_request_that_did_not_finish_counts_only_when_it_was_late_already() -> None:
    correction = Correction()
    for _ in range(LEAST_SAMPLES):
        correction.observe(predicted=10.0, actual=1.0, finished=False)  # cancelled early: nothing known
    assert correction.samples == 0
    for _ in range(LEAST_SAMPLES):
        correction.observe(predicted=10.0, actual=30.0, finished=False)  # ran out of time at 3x: at least 3x
    assert correction.factor == pytest.approx(3.0)
    with pytest.raises(ValueError, match="window"):
        Correction(window=0)
    with pytest.raises(ValueError, match="quantile"):
        Correction(quantile=0)


def test_a_size_never_run_is_tried_alone_and_counts_as_work_ahead_of_the_next() -> None:
    waits = WaitEstimator(piece_tokens=100)
    _measure(waits, 1000, 2.0)
    _measure(waits, 2000, 6.0)  # 8,000 tokens: extrapolated at 72 s
    assert waits.extrapolated(8000)
    assert not waits.extrapolated(2047)
    assert waits.refusal(8000, remaining=10.0) is None  # nothing ahead: running it measures it
    waits.started(8000)
    behind = waits.refusal(8000, remaining=100.0)  # 72 s ahead + its own 72 s
    assert behind is not None
    assert behind.retry_after == pytest.approx(144.0 - 100.0)
    assert waits.refusal(8000, remaining=150.0) is None
    refused = waits.refusal(2000, remaining=3.0)  # a measured size alone over its deadline: refused
    assert refused is not None
    assert "longer deadline" in str(refused)
