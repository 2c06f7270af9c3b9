"""Faults and overload: deadlines, cancellation, the bounded queue, device out-of-memory.

The real tiny model runs every request. A forward pre-hook on its vision tower (:class:`ModelProbe`)
records the image grids of every forward, so a test can prove that a request never ran; it can hold
the forward of one marked request until the test releases it, which keeps the model thread busy
while other requests queue; and it can raise torch's out-of-memory error on the forward of another
marked request. Each test has its own server with a small queue.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwen25vl_embed import EmbeddingClient, EmbeddingError, Embeddings
from qwen25vl_embed.requests import build_request
from qwen25vl_embed.v1 import embed_pb2_grpc as pb_grpc
from qwen25vl_embed_server.core.errors import DeadlineExceededError
from qwen25vl_embed_server.core.model import extractor as extractor_module
from qwen25vl_embed_server.core.model import image_decoding
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.scheduling import batcher as batcher_module
from qwen25vl_embed_server.core.scheduling.batcher import Batcher, BatchingConfig
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import assert_batched_close, noise_image, png_bytes, server_config

OUTPUTS = ["projected_pooled_mean", "lm_image_pooled_mean", "lm_last_token"]
CALL_TIMEOUT = 30.0

# Image sizes (width, height), multiples of 28 so that each has a known grid (1, h/14, w/14)
# that marks its forwards. Every size is distinct: one size, one request.
HOLD = (84, 56)  # held in the model until the test releases it
LATE = (56, 112)
CANCELLED = (112, 56)
EXTRA = (140, 56)
OOM = (56, 140)  # the injected out-of-memory error
GOOD = ((56, 56), (56, 84), (84, 84), (112, 112))


def grid(size: tuple[int, int]) -> tuple[int, int, int]:
    width, height = size
    return (1, height // 14, width // 14)


def image_bytes(size: tuple[int, int]) -> bytes:
    return png_bytes(noise_image(*size, seed=size[0] * 1000 + size[1]))


class ModelProbe:
    """A forward pre-hook on the vision tower of ``extractor``; removed on exit.

    ``forwards``: the image grids of each vision-tower forward, in order. A forward that includes
    the grid of ``hold`` waits until :meth:`release` (``holding`` is set meanwhile); one that
    includes the grid of ``oom`` raises ``oom_error`` (default ``torch.OutOfMemoryError``, as CUDA
    does; ``MemoryError`` is what the CPU gives).
    """

    def __init__(
        self,
        extractor: Extractor,
        hold: tuple[int, int] | None = None,
        oom: tuple[int, int] | None = None,
        oom_error: BaseException | None = None,
    ) -> None:
        self._oom_error = oom_error or torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 20.00 GiB (injected)"
        )
        self._visual = extractor.loaded.visual
        self._hold = grid(hold) if hold else None
        self._oom = grid(oom) if oom else None
        self._lock = threading.Lock()
        self._released = threading.Event()
        self.holding = threading.Event()
        self.forwards: list[list[tuple[int, ...]]] = []

    def __enter__(self) -> ModelProbe:
        self._handle = self._visual.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
        self._handle.remove()

    def release(self) -> None:
        self._released.set()

    def ran(self, size: tuple[int, int]) -> bool:
        """Whether any forward so far included the image of ``size``."""
        with self._lock:
            return any(grid(size) in rows for rows in self.forwards)

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        grid_thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        rows = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        with self._lock:
            self.forwards.append(rows)
        if self._hold in rows:
            self.holding.set()
            if not self._released.wait(CALL_TIMEOUT):
                raise RuntimeError("the test never released the held forward")
        if self._oom in rows:
            raise self._oom_error


@contextmanager
def serving(extractor: Extractor, batching: BatchingConfig) -> Iterator[tuple[BackgroundServer, EmbeddingClient]]:
    with (
        BackgroundServer(extractor, server_config(batching=batching)) as server,
        EmbeddingClient(server.address, timeout=CALL_TIMEOUT) as sdk,
    ):
        yield server, sdk


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


def status_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except EmbeddingError as error:
        return error.code
    return grpc.StatusCode.OK


def assert_matches(result: Embeddings, reference: Embeddings) -> None:
    for name in OUTPUTS:
        assert_batched_close(result[name], reference[name], name)


@pytest.fixture(scope="module")
def references(client: EmbeddingClient) -> dict[tuple[int, int], Embeddings]:
    """Each size's result, one request at a time on the shared server."""
    return {size: client.extract(image_bytes(size), outputs=OUTPUTS) for size in (HOLD, *GOOD)}


def test_a_request_whose_deadline_passes_while_queued_is_dropped_unrun(
    extractor: Extractor, references: dict[tuple[int, int], Embeddings]
) -> None:
    with (
        serving(extractor, BatchingConfig(max_wait_ms=1)) as (server, sdk),
        ThreadPoolExecutor(2) as pool,
        ModelProbe(extractor, hold=HOLD) as probe,
    ):
        first = pool.submit(sdk.extract, image_bytes(HOLD), outputs=OUTPUTS)
        assert probe.holding.wait(CALL_TIMEOUT)
        started = time.monotonic()
        code = status_of(lambda: sdk.extract(image_bytes(LATE), outputs=OUTPUTS, timeout=0.5))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 5  # the caller hears at its deadline, not after the model
        # Its place in the queue is free while the model is still busy.
        wait_for(lambda: server.pipeline.batcher.queue_depth == 0, "the expired request left the queue")
        probe.release()
        assert_matches(first.result(CALL_TIMEOUT), references[HOLD])
        assert_matches(sdk.extract(image_bytes(GOOD[0]), outputs=OUTPUTS), references[GOOD[0]])
    assert not probe.ran(LATE)
    assert probe.ran(GOOD[0])


def test_a_fault_of_the_batcher_itself_fails_that_request_and_the_batcher_goes_on(
    extractor: Extractor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception in the batcher's own bookkeeping does not end its loop (every caller would then
    wait forever): the request it was handling fails with that error and the next one runs."""
    item = extractor.prepare([noise_image(*GOOD[0])], plan=extractor.plan(OUTPUTS))
    real_images = batcher_module._images
    calls = 0

    def images_failing_once(pending_item: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("injected fault in the batcher")
        return real_images(pending_item)

    monkeypatch.setattr(batcher_module, "_images", images_failing_once)

    async def scenario() -> None:
        batcher = Batcher(extractor, BatchingConfig(max_wait_ms=1))
        try:
            with pytest.raises(KeyError, match="injected"):
                await asyncio.wait_for(batcher.submit(item), CALL_TIMEOUT)
            result = await asyncio.wait_for(batcher.submit(item), CALL_TIMEOUT)
            assert set(result.tensors) >= set(OUTPUTS)
        finally:
            await batcher.close()

    asyncio.run(scenario())
    assert calls > 1


def test_the_batcher_drops_a_request_whose_deadline_passed_in_the_queue(extractor: Extractor) -> None:
    """Without gRPC: the deadline given to submit() alone keeps the request off the model."""
    held = extractor.prepare([noise_image(*HOLD)], plan=extractor.plan(OUTPUTS))
    late = extractor.prepare([noise_image(*LATE)], plan=extractor.plan(OUTPUTS))

    async def scenario(probe: ModelProbe) -> None:
        batcher = Batcher(extractor, BatchingConfig(max_wait_ms=1))
        try:
            first = asyncio.ensure_future(batcher.submit(held))
            assert await asyncio.to_thread(probe.holding.wait, CALL_TIMEOUT)
            second = asyncio.ensure_future(batcher.submit(late, deadline=time.monotonic() + 0.2))
            await asyncio.sleep(0.4)  # the deadline passes while the model is busy
            probe.release()
            await asyncio.wait_for(first, CALL_TIMEOUT)
            with pytest.raises(DeadlineExceededError):
                await asyncio.wait_for(second, CALL_TIMEOUT)
            assert batcher.queue_depth == 0
        finally:
            await batcher.close()

    with ModelProbe(extractor, hold=HOLD) as probe:
        asyncio.run(scenario(probe))
    assert probe.ran(HOLD)
    assert not probe.ran(LATE)


def test_a_cancelled_request_frees_its_place_and_never_runs(
    extractor: Extractor, references: dict[tuple[int, int], Embeddings]
) -> None:
    with (
        serving(extractor, BatchingConfig(max_wait_ms=1, max_queue=1)) as (server, sdk),
        grpc.insecure_channel(server.address) as channel,
        ThreadPoolExecutor(2) as pool,
        ModelProbe(extractor, hold=HOLD) as probe,
    ):
        batcher = server.pipeline.batcher
        first = pool.submit(sdk.extract, image_bytes(HOLD), outputs=OUTPUTS)
        assert probe.holding.wait(CALL_TIMEOUT)
        call = pb_grpc.EmbeddingServiceStub(channel).Extract(
            build_request(image_bytes(CANCELLED), outputs=OUTPUTS), timeout=CALL_TIMEOUT
        )
        wait_for(lambda: batcher.queue_depth == 1, "the request to cancel is queued")
        call.cancel()
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
        assert caught.value.code() == grpc.StatusCode.CANCELLED
        wait_for(lambda: batcher.queue_depth == 0, "the cancelled request left the queue")
        # The queue holds one request: this one would be refused if the cancelled one kept its place.
        then: Future[Embeddings] = pool.submit(sdk.extract, image_bytes(GOOD[1]), outputs=OUTPUTS)
        wait_for(lambda: batcher.queue_depth == 1 or then.done(), "the next request is queued")
        probe.release()
        assert_matches(first.result(CALL_TIMEOUT), references[HOLD])
        assert_matches(then.result(CALL_TIMEOUT), references[GOOD[1]])
    assert not probe.ran(CANCELLED)


def test_a_full_queue_refuses_new_requests_at_once_and_serves_the_accepted_ones(
    extractor: Extractor, references: dict[tuple[int, int], Embeddings]
) -> None:
    with (
        serving(extractor, BatchingConfig(max_wait_ms=1, max_queue=2)) as (server, sdk),
        ThreadPoolExecutor(8) as pool,
        ModelProbe(extractor, hold=HOLD) as probe,
    ):
        batcher = server.pipeline.batcher
        first = pool.submit(sdk.extract, image_bytes(HOLD), outputs=OUTPUTS)
        assert probe.holding.wait(CALL_TIMEOUT)
        queued = {size: pool.submit(sdk.extract, image_bytes(size), outputs=OUTPUTS) for size in GOOD[:2]}
        wait_for(lambda: batcher.queue_depth == 2, "two requests are queued")
        # While the model is still held, every further request is refused: at once, with a message.
        for seed in range(6):
            with pytest.raises(EmbeddingError) as caught:
                sdk.extract(png_bytes(noise_image(*EXTRA, seed=seed)), outputs=OUTPUTS)
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "capacity (2 requests queued)" in caught.value.details
            assert "retry" in caught.value.details
            assert batcher.queue_depth == 2
        assert not first.done()
        probe.release()
        assert_matches(first.result(CALL_TIMEOUT), references[HOLD])
        for size, result in queued.items():
            assert_matches(result.result(CALL_TIMEOUT), references[size])
        assert batcher.queue_depth == 0
    assert not probe.ran(EXTRA)


@pytest.mark.parametrize(
    "oom_error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)"),
        MemoryError(),  # the CPU's: host RAM ran out
    ],
    ids=["device", "host"],
)
def test_out_of_memory_fails_only_that_request_and_the_server_goes_on(
    extractor: Extractor,
    references: dict[tuple[int, int], Embeddings],
    monkeypatch: pytest.MonkeyPatch,
    oom_error: BaseException,
) -> None:
    releases: list[torch.device] = []
    release_device_memory = extractor_module._release_device_memory

    def counting_release(device: torch.device) -> None:
        releases.append(device)
        release_device_memory(device)

    monkeypatch.setattr(extractor_module, "_release_device_memory", counting_release)
    with (
        # One lane: with the CPU's default two (given two torch threads, as when this test runs
        # alone), the four queued requests are shared between them as two batches.
        serving(extractor, BatchingConfig(max_wait_ms=1, lanes=1)) as (server, sdk),
        ThreadPoolExecutor(8) as pool,
        ModelProbe(extractor, hold=HOLD, oom=OOM, oom_error=oom_error) as probe,
    ):
        first = pool.submit(sdk.extract, image_bytes(HOLD), outputs=OUTPUTS)
        assert probe.holding.wait(CALL_TIMEOUT)
        # Queue the failing request among good ones, so that they first run as one batch.
        good = {size: pool.submit(sdk.extract, image_bytes(size), outputs=OUTPUTS) for size in GOOD[:3]}
        failing = pool.submit(sdk.extract, image_bytes(OOM), outputs=OUTPUTS)
        wait_for(lambda: server.pipeline.batcher.queue_depth == 4, "four requests are queued")
        probe.release()
        with pytest.raises(EmbeddingError) as caught:
            failing.result(CALL_TIMEOUT)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "out of memory" in caught.value.details
        assert_matches(first.result(CALL_TIMEOUT), references[HOLD])
        for size, result in good.items():
            assert_matches(result.result(CALL_TIMEOUT), references[size])
        # The server goes on: healthy, and serving the next requests.
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert_matches(sdk.extract(image_bytes(GOOD[3]), outputs=OUTPUTS), references[GOOD[3]])
    # The four queued requests ran as one batch, which failed; then each ran alone, then the last one.
    queued = sorted(grid(size) for size in (*GOOD[:3], OOM))
    assert sorted(probe.forwards[1]) == queued
    assert sorted(rows[0] for rows in probe.forwards[2:6]) == queued
    assert probe.forwards[2:] == [[rows[0]] for rows in probe.forwards[2:6]] + [[grid(GOOD[3])]]
    assert releases == [extractor.loaded.device] * 2  # after the batch, and after the request alone


def test_requests_beyond_the_in_flight_bound_are_refused_before_any_work(
    extractor: Extractor, references: dict[tuple[int, int], Embeddings]
) -> None:
    """Admitted requests (preprocessing, queued or running) are bounded: beyond, refused at once."""
    config = server_config(max_in_flight=2, batching=BatchingConfig(max_wait_ms=1, max_queue=8))
    with (
        BackgroundServer(extractor, config) as server,
        EmbeddingClient(server.address, timeout=CALL_TIMEOUT) as sdk,
        ThreadPoolExecutor(4) as pool,
        ModelProbe(extractor, hold=HOLD) as probe,
    ):
        first = pool.submit(sdk.extract, image_bytes(HOLD), outputs=OUTPUTS)
        assert probe.holding.wait(CALL_TIMEOUT)
        queued = pool.submit(sdk.extract, image_bytes(GOOD[0]), outputs=OUTPUTS)
        wait_for(lambda: server.pipeline.batcher.queue_depth == 1, "one request is queued")
        # The queue has room for 7 more, but 2 requests are in flight: the next is refused.
        with pytest.raises(EmbeddingError, match=r"RESOURCE_EXHAUSTED.*2 requests in flight"):
            sdk.extract(image_bytes(EXTRA), outputs=OUTPUTS)
        probe.release()
        assert_matches(first.result(CALL_TIMEOUT), references[HOLD])
        assert_matches(queued.result(CALL_TIMEOUT), references[GOOD[0]])
        # Capacity comes back once requests finish.
        assert_matches(sdk.extract(image_bytes(GOOD[1]), outputs=OUTPUTS), references[GOOD[1]])
    assert not probe.ran(EXTRA)


def test_out_of_memory_while_preprocessing_fails_only_that_request(
    extractor: Extractor, references: dict[tuple[int, int], Embeddings], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_decode = image_decoding.decode_image

    def decode(data: bytes, index: int = 0, max_pixels: int = 0) -> Any:
        if data == image_bytes(OOM):
            raise MemoryError  # what a huge decode or processor array gives on the CPU
        return real_decode(data, index, max_pixels)

    monkeypatch.setattr(image_decoding, "decode_image", decode)
    # prepare_request imports decode_image from image_decoding at call time: the patch applies.
    with serving(extractor, BatchingConfig(max_wait_ms=1)) as (_server, sdk):
        with pytest.raises(EmbeddingError) as caught:
            sdk.extract(image_bytes(OOM), outputs=OUTPUTS)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "ran out of memory preprocessing" in caught.value.details
        assert_matches(sdk.extract(image_bytes(GOOD[0]), outputs=OUTPUTS), references[GOOD[0]])
