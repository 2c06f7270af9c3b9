"""ExtractBatch and the SDK's extract_many: input order, per-request errors, bounded windows."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import grpc
import numpy as np
import pytest

from qwen25vl_embed import EmbeddingClient, EmbeddingError, Embeddings
from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed.v1 import embed_pb2_grpc as pb_grpc
from qwen25vl_embed_server.core.model.finishing import Extraction
from qwen25vl_embed_server.core.scheduling.batcher import BatchingConfig
from qwen25vl_embed_server.core.scheduling.pipeline import Pipeline
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import noise_image, png_bytes

OUTPUTS = ["projected_tokens", "lm_pooled_mean", "lm_last_token"]


def _images(count: int) -> list[bytes]:
    sizes = [(56, 56), (224, 112), (140, 84), (28, 280)]
    return [png_bytes(noise_image(*sizes[i % len(sizes)], seed=i)) for i in range(count)]


def _assert_close(result: Embeddings, expected: Embeddings) -> None:
    assert result.names == expected.names
    for name in expected.names:
        np.testing.assert_allclose(result[name], expected[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_extract_many_yields_every_result_in_input_order(client: EmbeddingClient) -> None:
    images = _images(10)
    results = list(client.extract_many(images, outputs=OUTPUTS, concurrency=4))
    assert len(results) == len(images)
    for image, result in zip(images, results, strict=True):
        assert isinstance(result, Embeddings)
        _assert_close(result, client.extract(image, outputs=OUTPUTS))


def test_a_failed_request_is_reported_in_place_and_the_stream_goes_on(client: EmbeddingClient) -> None:
    images = _images(5)
    images[2] = b"definitely not an image"
    results = list(client.extract_many(images, concurrency=3, errors="return"))
    assert [type(r).__name__ for r in results] == [
        "Embeddings",
        "Embeddings",
        "EmbeddingError",
        "Embeddings",
        "Embeddings",
    ]
    error = results[2]
    assert isinstance(error, EmbeddingError)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "request 2: image 0 could not be decoded" in error.details


def test_errors_raise_at_their_turn_by_default(client: EmbeddingClient) -> None:
    images = _images(3)
    images[1] = b""  # rejected by the SDK before sending, reported in its place all the same
    seen: list[Embeddings | EmbeddingError] = []

    def consume() -> None:
        seen.extend(client.extract_many(images, concurrency=1))

    with pytest.raises(EmbeddingError, match="request 1: image bytes are empty"):
        consume()
    images[1] = b"GIF89a-broken"
    with pytest.raises(EmbeddingError, match="INVALID_ARGUMENT"):
        consume()
    assert len(seen) == 2  # the first image of each run was yielded before the failure


def test_client_window_bounds_requests_ahead_of_consumption(client: EmbeddingClient) -> None:
    pulled = 0

    def lazily() -> Iterator[bytes]:
        nonlocal pulled
        for image in _images(12):
            pulled += 1
            yield image

    concurrency = 3
    for consumed, _ in enumerate(client.extract_many(lazily(), concurrency=concurrency), start=1):
        assert pulled <= consumed + concurrency + 1


class _CountingRuns:
    """The real service, recording how many requests of a stream were being extracted (or their
    results sent) at once."""

    in_flight = 0
    most = 0

    def __init__(self, running: Callable[..., AbstractAsyncContextManager[Extraction]]) -> None:
        self._running = running

    @asynccontextmanager
    async def __call__(self, pipeline: Pipeline, *args: Any, **kwargs: Any) -> AsyncIterator[Extraction]:
        type(self).in_flight += 1
        type(self).most = max(type(self).most, type(self).in_flight)
        try:
            async with self._running(pipeline, *args, **kwargs) as result:
                yield result
        finally:
            type(self).in_flight -= 1


def test_server_reads_no_further_ahead_than_its_stream_window(
    tiny_server: Callable[..., BackgroundServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = _CountingRuns(Pipeline.running)
    monkeypatch.setattr(Pipeline, "running", lambda *args, **kwargs: counting(*args, **kwargs))
    requests = [pb.ImageRequest(images=[pb.Image(data=data)], request_id=f"r{i}") for i, data in enumerate(_images(8))]
    with (
        tiny_server(stream_window=2, batching=BatchingConfig(max_wait_ms=20)) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        responses = list(pb_grpc.EmbeddingServiceStub(channel).ExtractBatch(iter(requests)))
    assert _CountingRuns.most == 2
    finished = [r.request_id for r in responses if r.last]
    assert sorted(finished) == sorted(r.request_id for r in requests)
    # Each request's responses are consecutive: metadata first, `last` at the end.
    current = None
    for response in responses:
        if current is None:
            assert response.HasField("metadata")
            current = response.request_id
        assert response.request_id == current
        if response.last:
            current = None


def test_concurrent_requests_are_batched(tiny_server: Callable[..., BackgroundServer]) -> None:
    """Requests arriving together run as fewer forwards than requests."""
    with tiny_server(batching=BatchingConfig(max_wait_ms=200)) as server, EmbeddingClient(server.address) as sdk:
        before = server.pipeline.batcher.batches_run
        results = list(sdk.extract_many(_images(8), outputs=OUTPUTS, concurrency=8))
        batches = server.pipeline.batcher.batches_run - before
    assert len(results) == 8
    assert batches < 8
