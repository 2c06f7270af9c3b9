"""A small load test over loopback: concurrent clients mixing good, bad, cancelled and
deadline-limited requests and ExtractBatch streams (``bench.service.load_test`` at a small scale).

Every good request gets exactly its own result (its request id, and the values of its image run
alone beforehand), no request is lost or answered twice, and the server stays healthy: SERVING,
an empty queue, and a correct result for the next request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
import pytest
from bench.service.load_test import LoadConfig, run_load

from qwen25vl_embed_server.core.scheduling.batcher import BatchingConfig
from qwen25vl_embed_server.rpc.harness import BackgroundServer

log = logging.getLogger(__name__)


def test_mixed_load_loses_nothing_and_gives_every_request_its_own_result(
    tiny_server: Callable[..., BackgroundServer],
) -> None:
    config = LoadConfig(
        clients=12,
        requests_per_client=10,
        mix={"good": 0.45, "bad": 0.15, "cancelled": 0.15, "deadline": 0.15, "stream": 0.1},
        stream_length=3,
        distinct_images=6,
        call_timeout=30,
        max_seconds=60,
    )
    with tiny_server(batching=BatchingConfig(max_wait_ms=5)) as server:
        report = run_load(server.address, config)
        batcher = server.pipeline.batcher
        assert batcher.queue_depth == 0
        batches = batcher.batches_run
    log.info("load test:\n%s", report.summary())
    print(report.summary())  # the figures, shown with pytest -s

    assert report.lost == 0
    assert report.duplicated == 0
    assert report.wrong == []
    assert report.unexpected == []
    assert report.healthy
    # Every kind was exercised, and the faults happened, not just the good paths.
    assert report.count("good", "OK") >= 30
    assert report.count("bad", grpc.StatusCode.INVALID_ARGUMENT.name) >= 8
    assert report.count("stream good", "OK") >= 4
    assert report.count("cancelled", grpc.StatusCode.CANCELLED.name) >= 1
    assert report.count("deadline", grpc.StatusCode.DEADLINE_EXCEEDED.name) >= 1
    assert report.count() == report.requests
    # The clients were concurrent: requests shared forwards.
    assert batches < report.count(outcome="OK")


def test_the_load_test_refuses_a_remote_server() -> None:
    with pytest.raises(ValueError, match="loopback only"):
        run_load("192.0.2.1:50051", LoadConfig(clients=1, requests_per_client=1))
