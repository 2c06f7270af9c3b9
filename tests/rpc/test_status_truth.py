"""Metrics and the request log record the status the client received, also when gRPC (not our
code) ended the call: its deadline passed (DEADLINE_EXCEEDED), or the server stopped at the end of
its grace period (UNAVAILABLE)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from qwen25vl_embed import EmbeddingClient, EmbeddingError
from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed_server.core.errors import SlowConsumerError
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.scheduling.batcher import BatchingConfig
from qwen25vl_embed_server.rpc.calls import EmbeddingCalls, ServiceConfig
from qwen25vl_embed_server.rpc.error_mapping import status_for
from qwen25vl_embed_server.rpc.harness import BackgroundServer
from qwen25vl_embed_server.rpc.messages import Response
from qwen25vl_embed_server.rpc.metrics import Metrics
from qwen25vl_embed_server.rpc.servicer import EmbeddingService

from ..helpers import server_config
from .test_faults import CALL_TIMEOUT, GOOD, HOLD, LATE, OUTPUTS, ModelProbe, image_bytes

GOOD_SIZE = GOOD[0]

REQUEST_LOG = "qwen25vl_embed_server.requests"


def logged_status(caplog: pytest.LogCaptureFixture, request_id: str) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for record in caplog.records:
            if record.name == REQUEST_LOG and vars(record)["request_id"] == request_id:
                return str(vars(record)["status"])
        time.sleep(0.01)
    raise AssertionError(f"no request log line for {request_id}")


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except EmbeddingError as error:
        return error.code
    return grpc.StatusCode.OK


def counted(metrics: Metrics, status: str) -> float:
    sample = metrics.registry.get_sample_value("qwen25vl_embed_requests_total", {"method": "Extract", "status": status})
    return sample or 0.0


def test_a_deadline_is_recorded_as_deadline_exceeded(extractor: Extractor, caplog: pytest.LogCaptureFixture) -> None:
    with (
        BackgroundServer(extractor, server_config(batching=BatchingConfig(max_wait_ms=1))) as server,
        EmbeddingClient(server.address, timeout=CALL_TIMEOUT) as sdk,
        ThreadPoolExecutor(1) as pool,
        ModelProbe(extractor, hold=HOLD) as probe,
        caplog.at_level(logging.INFO, logger=REQUEST_LOG),
    ):
        held = pool.submit(sdk.extract, image_bytes(HOLD), outputs=OUTPUTS, request_id="held")
        assert probe.holding.wait(CALL_TIMEOUT)
        code = code_of(lambda: sdk.extract(image_bytes(LATE), outputs=OUTPUTS, request_id="late", timeout=0.3))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert logged_status(caplog, "late") == code.name
        assert counted(server.service.metrics, "DEADLINE_EXCEEDED") == 1
        assert counted(server.service.metrics, "CANCELLED") == 0
        probe.release()
        held.result(CALL_TIMEOUT)


def test_a_call_cut_at_the_end_of_the_grace_period_is_recorded_as_the_client_saw_it(
    extractor: Extractor, caplog: pytest.LogCaptureFixture
) -> None:
    server = BackgroundServer(extractor, server_config(batching=BatchingConfig(max_wait_ms=1))).start()
    with (
        # The default retries: they find no server, and the call ends with the status it was cut with.
        EmbeddingClient(server.address, timeout=CALL_TIMEOUT) as sdk,
        ThreadPoolExecutor(2) as pool,
        ModelProbe(extractor, hold=HOLD) as probe,
        caplog.at_level(logging.INFO, logger=REQUEST_LOG),
    ):
        held = pool.submit(code_of, lambda: sdk.extract(image_bytes(HOLD), outputs=OUTPUTS, request_id="cut"))
        assert probe.holding.wait(CALL_TIMEOUT)
        metrics = server.service.metrics
        stopped = pool.submit(server.stop, 0.2)
        code = held.result(CALL_TIMEOUT)
        assert code == grpc.StatusCode.UNAVAILABLE
        assert logged_status(caplog, "cut") == code.name
        assert counted(metrics, "UNAVAILABLE") == 1
        probe.release()
        stopped.result(CALL_TIMEOUT)


def test_stop_returns_after_the_grace_period_even_mid_forward(extractor: Extractor) -> None:
    """A forward still running when the grace period ends is not waited for (the process then
    exits at once: ``serve`` leaves without joining the model thread)."""
    server = BackgroundServer(extractor, server_config(batching=BatchingConfig(max_wait_ms=1))).start()
    with (
        # The default retries: they find no server, and the call ends with the status it was cut with.
        EmbeddingClient(server.address, timeout=CALL_TIMEOUT) as sdk,
        ThreadPoolExecutor(2) as pool,
        ModelProbe(extractor, hold=HOLD) as probe,
    ):
        held = pool.submit(code_of, lambda: sdk.extract(image_bytes(HOLD), outputs=OUTPUTS))
        assert probe.holding.wait(CALL_TIMEOUT)
        stopped = pool.submit(server.stop, 0.2)
        stopped.result(CALL_TIMEOUT / 3)  # the forward is held for CALL_TIMEOUT: stop did not wait for it
        assert held.result(CALL_TIMEOUT) == grpc.StatusCode.UNAVAILABLE
        assert not probe._released.is_set()  # still mid-forward
        probe.release()


def test_a_batch_caller_that_reads_nothing_is_ended_and_its_results_freed(extractor: Extractor) -> None:
    """Transport-neutral: a ``write`` that never completes is what gRPC's flow control gives a
    caller that stopped reading (measured: about 20 MiB of writes complete, then they block)."""

    async def scenario() -> tuple[BaseException, int, int]:
        calls = EmbeddingCalls(ServiceConfig(send_timeout_seconds=0.2))
        calls.attach(extractor)
        try:

            async def requests() -> AsyncIterator[pb.ImageRequest]:
                for i in range(3):
                    image = pb.Image(data=image_bytes(GOOD_SIZE))
                    yield pb.ImageRequest(images=[image], outputs=OUTPUTS, request_id=str(i))

            async def never(message: Response) -> None:
                await asyncio.Event().wait()

            with pytest.raises(SlowConsumerError, match=r"read no response for 0\.2 s") as caught:
                await asyncio.wait_for(calls.extract_batch(requests(), None, never), CALL_TIMEOUT)
            budget = calls.pipeline.result_bytes
            return caught.value, budget.used, budget.peak
        finally:
            await calls.close()

    error, used, peak = asyncio.run(scenario())
    assert status_for(error)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert peak > 0  # results were held for the caller ...
    assert used == 0  # ... and freed when its call ended


def test_an_extract_caller_that_reads_nothing_is_ended_and_its_result_freed(extractor: Extractor) -> None:
    """The servicer writes each message with a timeout: a context whose write never completes
    stands for a caller whose flow-control window stays full."""

    class StalledContext:
        def time_remaining(self) -> float | None:
            return None

        async def write(self, message: pb.EmbeddingResponse) -> None:
            await asyncio.Event().wait()

    async def scenario() -> tuple[int, int]:
        service = EmbeddingService(ServiceConfig(send_timeout_seconds=0.2))
        service.attach(extractor)
        try:
            request = pb.ImageRequest(images=[pb.Image(data=image_bytes(GOOD_SIZE))], outputs=OUTPUTS)
            with pytest.raises(SlowConsumerError, match=r"read no response for 0\.2 s"):
                await asyncio.wait_for(service.Extract(request, StalledContext()), CALL_TIMEOUT)  # type: ignore[arg-type]
            budget = service.calls.pipeline.result_bytes
            return budget.used, budget.peak
        finally:
            await service.close()

    used, peak = asyncio.run(scenario())
    assert peak > 0
    assert used == 0
