"""Deadline-aware admission over real gRPC with the tiny model: with slow work queued, a slow
request whose deadline the work ahead cannot meet is refused at once (RESOURCE_EXHAUSTED, a
``grpc-retry-pushback-ms`` hint, the ``deadline`` refusal counted), while a fast request and a slow
one with room in their deadlines, and one without a deadline, are answered with their results.

Slow requests are 4 images of 896 x 896 asking for vision outputs only (16,384 patches, above the
4,096-token pieces: they run in pieces, one image each); fast ones one 56 x 56 image. The deadlines
are far from the estimates on either side (the refused ones get a third of the way from their own
cost to their estimated wait, or a third of their own cost; the answered ones minutes), so the
outcome does not depend on this machine's speed; the one timing asserted is that a refusal comes
within 5 s of the call.

A fresh server (its calibration on, no request of the load's size run before) refuses at once a
request given a quarter of its estimated wait behind four others, and the work ahead of it was
indeed still running at that deadline; one with ten times the wait is answered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from qwen25vl_embed import EmbeddingClient, EmbeddingError
from qwen25vl_embed.errors import from_rpc_error
from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed_server.core.admission.overload import Admission
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.scheduling.batcher import BatchingConfig
from qwen25vl_embed_server.core.scheduling.pipeline import PipelineConfig
from qwen25vl_embed_server.rpc.calls import ServiceConfig
from qwen25vl_embed_server.rpc.error_mapping import PUSHBACK_KEY, RETRY_AFTER_KEY
from qwen25vl_embed_server.rpc.harness import BackgroundServer
from qwen25vl_embed_server.rpc.server import ServerConfig

from ..helpers import assert_batched_close, noise_image, png_bytes

SLOW = [png_bytes(noise_image(896, 896, seed)) for seed in range(4)]
SLOW_OUTPUTS = ["vision_pooled_mean"]
FAST = png_bytes(noise_image(56, 56, 7))
FAST_OUTPUTS = ["lm_last_token"]
LOAD = 4  # slow requests without a deadline, in flight while the others arrive
METHOD = "/qwen25vl_embed.v1.EmbeddingService/Extract"


@pytest.fixture(scope="module")
def piecewise(tiny_server: Callable[..., BackgroundServer]) -> Iterator[BackgroundServer]:
    with tiny_server(batching=BatchingConfig(max_piece_tokens=4096, max_wait_ms=1)) as running:
        yield running


def _slow_tokens(server: BackgroundServer) -> int:
    return max(server.pipeline.admission.waits._in_flight, default=0)


def _refused(address: str, timeout: float) -> tuple[grpc.RpcError, float]:
    """The error of a slow request sent over plain gRPC (no SDK retries) with ``timeout``, and how
    long it took to come."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_stream(METHOD, pb.ImageRequest.SerializeToString, pb.EmbeddingResponse.FromString)
        request = pb.ImageRequest(images=[pb.Image(data=data) for data in SLOW], outputs=SLOW_OUTPUTS)
        sent = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            list(call(request, timeout=timeout))
        return refused.value, time.monotonic() - sent


def _trailing(error: grpc.RpcError) -> dict[str, str]:
    return {str(item.key): str(item.value) for item in error.trailing_metadata() or ()}


def test_a_slow_request_that_cannot_finish_in_time_is_refused_at_once_the_others_answered(
    piecewise: BackgroundServer,
) -> None:
    admission = piecewise.pipeline.admission
    with EmbeddingClient(piecewise.address, timeout=600) as client:
        slow_reference = client.extract(SLOW, outputs=SLOW_OUTPUTS)["vision_pooled_mean"]
        fast_reference = client.extract(FAST, outputs=FAST_OUTPUTS)["lm_last_token"]
        assert len(admission.waits._per_token) >= 2  # both sizes measured

        loaded: list[np.ndarray] = []

        def slow() -> None:
            loaded.append(client.extract(SLOW, outputs=SLOW_OUTPUTS)["vision_pooled_mean"])

        load = _started(slow, LOAD, admission)
        assert admission.waits.requests >= LOAD
        slow_tokens = _slow_tokens(piecewise)
        wait, alone = admission.waits.wait(slow_tokens), admission.waits.cost(slow_tokens)
        assert wait is not None
        assert alone is not None
        refused_before = admission.refusals["deadline"]

        # Between its own cost and the wait: it could run alone in time, not behind the work ahead
        # (a third of the way: still refused if up to three of the load finish meanwhile).
        error, took = _refused(piecewise.address, alone + (wait - alone) / 3)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "past its deadline" in str(error.details())
        assert took < 5.0
        trailing = _trailing(error)
        assert trailing[PUSHBACK_KEY] == "-1"  # a retry within this call would be refused too
        assert int(trailing[RETRY_AFTER_KEY]) > 0  # a new call, later, would pass
        assert from_rpc_error(error).retry_after == int(trailing[RETRY_AFTER_KEY]) / 1000
        # Under its own cost: no retry can help.
        error, took = _refused(piecewise.address, alone / 3)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "longer deadline" in str(error.details())
        assert took < 5.0
        assert _trailing(error)[PUSHBACK_KEY] == "-1"  # do not retry
        assert admission.refusals["deadline"] == refused_before + 2

        # Fast work with room in its deadline passes the slow work (between its pieces).
        fast = client.extract(FAST, outputs=FAST_OUTPUTS, timeout=300)["lm_last_token"]
        assert_batched_close(fast, fast_reference, "fast")
        # Slow work with room in its deadline, and slow work without one, wait and are answered.
        patient = client.extract(SLOW, outputs=SLOW_OUTPUTS, timeout=600)["vision_pooled_mean"]
        assert_batched_close(patient, slow_reference, "slow, with a deadline")
        for thread in load:
            thread.join()
        assert len(loaded) == LOAD
        for result in loaded:
            assert_batched_close(result, slow_reference, "slow, without a deadline")
    assert admission.refusals["deadline"] == refused_before + 2
    sample = piecewise.service.metrics.registry.get_sample_value
    assert sample("qwen25vl_embed_refusals_total", {"reason": "deadline"}) == admission.refusals["deadline"]


# A fresh server: no request of the load's size ran before; the costs come from the calibration.
UNSEEN = png_bytes(noise_image(1344, 1344, 11))  # 9,216 patches: about as large as the calibration goes
UNSEEN_OUTPUTS = ["lm_last_token"]
UNSEEN_LOAD = 4


def test_a_fresh_server_refuses_at_once_what_the_work_ahead_cannot_let_finish(extractor: Extractor) -> None:
    pipeline = PipelineConfig(calibration_seconds=10.0)
    config = ServerConfig(port=0, service=ServiceConfig(pipeline=pipeline))
    with BackgroundServer(extractor, config) as fresh:
        admission = fresh.pipeline.admission
        assert len(admission.waits.measured()) >= 2  # the calibration measured sizes before SERVING
        assert admission.waits.correction.samples == 0
        finished: list[float] = []
        with EmbeddingClient(fresh.address, timeout=600) as client:

            def load() -> None:
                client.extract(UNSEEN, outputs=UNSEEN_OUTPUTS)
                finished.append(time.monotonic())

            threads = _started(load, UNSEEN_LOAD, admission)
            assert admission.waits.requests == UNSEEN_LOAD
            tokens = _slow_tokens(fresh)
            wait = admission.waits.wait(tokens)
            assert wait is not None  # known from the start
            # A quarter of the estimated wait for four runs and its own: refused at once, and indeed
            # the work ahead of it was still running at its deadline (it could not have finished).
            deadline = wait / 4
            sent = time.monotonic()
            with EmbeddingClient(fresh.address, retry=None) as once, pytest.raises(EmbeddingError) as refused:
                once.extract(UNSEEN, outputs=UNSEEN_OUTPUTS, timeout=deadline)
            took = time.monotonic() - sent
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
            assert "past its deadline" in str(refused.value)
            assert took < 5.0
            assert admission.refusals["deadline"] == 1
            # With room (ten times the wait): admitted, and answered.
            patient = client.extract(UNSEEN, outputs=UNSEEN_OUTPUTS, timeout=10 * wait)["lm_last_token"]
            for thread in threads:
                thread.join()
            assert len(finished) == UNSEEN_LOAD
            assert max(finished) > sent + deadline
            reference = client.extract(UNSEEN, outputs=UNSEEN_OUTPUTS)["lm_last_token"]
        assert_batched_close(patient, reference, "admitted with room in its deadline")
        assert admission.refusals["deadline"] == 1


def _started(target: Callable[[], None], count: int, admission: Admission) -> list[threading.Thread]:
    """``count`` threads running ``target``, once the server counts that many requests in flight
    (or after a minute: the caller asserts how many it counts)."""
    threads = [threading.Thread(target=target) for _ in range(count)]
    for thread in threads:
        thread.start()
    until = time.monotonic() + 60
    while admission.waits.requests < count and time.monotonic() < until:
        time.sleep(0.01)
    return threads
