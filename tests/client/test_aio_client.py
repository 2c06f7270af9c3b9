"""AsyncEmbeddingClient against the real server: same results as the blocking client, input order,
errors in place, bearer tokens, and cancellation of calls in flight."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
import numpy as np
import pytest

from qwen25vl_embed import AsyncEmbeddingClient, EmbeddingClient, EmbeddingError, Embeddings
from qwen25vl_embed_server.rpc.auth import AuthConfig
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import noise_image, png_bytes

OUTPUTS = ["projected_tokens", "lm_pooled_mean", "lm_last_token"]
T = TypeVar("T")


def run(scenario: Callable[[AsyncEmbeddingClient], Awaitable[T]], address: str, **options: object) -> T:
    """Run ``scenario(client)`` in a fresh event loop, with a client made (and closed) in it."""

    async def main() -> T:
        async with AsyncEmbeddingClient(address, **options) as client:  # type: ignore[arg-type]
            return await scenario(client)

    return asyncio.run(main())


async def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the server")
        await asyncio.sleep(0.005)


def _images(count: int, size: int = 56) -> list[bytes]:
    return [png_bytes(noise_image(size + 28 * (i % 3), size, seed=i)) for i in range(count)]


def _assert_equal(result: Embeddings, expected: Embeddings) -> None:
    assert result.names == expected.names
    for name in expected.names:
        np.testing.assert_array_equal(result[name], expected[name], err_msg=name)
    np.testing.assert_array_equal(result.image_token_positions, expected.image_token_positions)
    assert result.sequence_length == expected.sequence_length


def test_extract_equals_the_blocking_clients_result(
    full_width_server: BackgroundServer, full_width_client: EmbeddingClient
) -> None:
    """Bit for bit: both runs use all of the model's threads (one lane)."""
    images = _images(2)

    async def scenario(aio: AsyncEmbeddingClient) -> Embeddings:
        return await aio.extract(images, prompt="Compare.", outputs=OUTPUTS, dtype="bfloat16", request_id="a1")

    result = run(scenario, full_width_server.address)
    _assert_equal(result, full_width_client.extract(images, prompt="Compare.", outputs=OUTPUTS, dtype="bfloat16"))
    assert result.request_id == "a1"
    assert result.timings is not None
    assert result.timings.model_ms > 0


def test_info_equals_the_blocking_clients(server: BackgroundServer, client: EmbeddingClient) -> None:
    async def scenario(aio: AsyncEmbeddingClient) -> object:
        return await aio.info()

    assert run(scenario, server.address) == client.info()


def test_failed_call_raises_embedding_error_with_the_status(server: BackgroundServer) -> None:
    async def scenario(aio: AsyncEmbeddingClient) -> None:
        await aio.extract(b"not an image")

    with pytest.raises(EmbeddingError) as caught:
        run(scenario, server.address)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_extract_many_keeps_input_order_and_reports_errors_in_place(
    server: BackgroundServer, client: EmbeddingClient
) -> None:
    images = _images(7)
    images[2] = b"definitely not an image"  # refused by the server
    images[5] = b""  # refused by the SDK, never sent

    async def lazily() -> AsyncIterator[bytes]:  # an async iterable works as well as a list
        for image in images:
            yield image

    async def scenario(aio: AsyncEmbeddingClient) -> list[Embeddings | EmbeddingError]:
        return [r async for r in aio.extract_many(lazily(), outputs=OUTPUTS, concurrency=3, errors="return")]

    results = run(scenario, server.address)
    # The server's refusal is an EmbeddingError; the SDK's own (never sent) a LocalRequestError.
    assert [type(r).__name__ for r in results] == ["Embeddings"] * 2 + ["EmbeddingError"] + ["Embeddings"] * 2 + [
        "LocalRequestError",
        "Embeddings",
    ]
    for image, result in zip(images, results, strict=True):
        if isinstance(result, Embeddings):  # batched with others: equal up to float reordering
            expected = client.extract(image, outputs=OUTPUTS)["lm_last_token"]
            np.testing.assert_allclose(result["lm_last_token"], expected, rtol=1e-5, atol=1e-5)
    assert isinstance(results[2], EmbeddingError)
    assert results[2].code == grpc.StatusCode.INVALID_ARGUMENT
    assert "request 2: image 0 could not be decoded" in results[2].details
    assert isinstance(results[5], EmbeddingError)
    assert "request 5: image bytes are empty" in results[5].details


def test_extract_many_raises_a_failed_request_at_its_turn(server: BackgroundServer) -> None:
    images = _images(3)
    images[1] = b"GIF89a-broken"
    seen: list[Embeddings | EmbeddingError] = []

    async def scenario(aio: AsyncEmbeddingClient) -> None:
        async for result in aio.extract_many(images, concurrency=1):
            seen.append(result)

    with pytest.raises(EmbeddingError, match="INVALID_ARGUMENT"):
        run(scenario, server.address)
    assert len(seen) == 1


def test_leaving_extract_many_early_ends_the_stream(server: BackgroundServer) -> None:
    async def scenario(aio: AsyncEmbeddingClient) -> Embeddings:
        async with contextlib.aclosing(aio.extract_many(_images(8), concurrency=2)) as results:
            async for _ in results:
                break
        await wait_until(lambda: _sample(server, "qwen25vl_embed_requests_in_progress", method="ExtractBatch") == 0)
        return await aio.extract(_images(1)[0])

    assert run(scenario, server.address).num_images == 1


def test_token_is_sent_on_a_plain_channel(tiny_server: Callable[..., BackgroundServer]) -> None:
    image = _images(1)[0]

    async def scenario(aio: AsyncEmbeddingClient) -> int:
        result = await aio.extract(image)
        streamed = [r async for r in aio.extract_many([image])]
        return result.num_images + len(streamed)

    with tiny_server(auth=AuthConfig(("s3cret-token",))) as server:
        assert run(scenario, server.address, token="s3cret-token") == 2
        with pytest.raises(EmbeddingError) as caught:
            run(scenario, server.address, token="wrong")
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


# --- cancellation -------------------------------------------------------------------------------


@pytest.fixture
def big_request() -> list[bytes]:
    """A request that keeps the tiny model busy for a while (16 images of 448x448)."""
    return _images(16, size=448)


def _sample(server: BackgroundServer, name: str, **labels: str) -> float:
    return server.service.metrics.registry.get_sample_value(name, labels) or 0.0


def test_cancelling_a_call_in_flight_stops_it_and_the_server_keeps_serving(
    server: BackgroundServer, big_request: list[bytes]
) -> None:
    cancelled = ("qwen25vl_embed_requests_total", {"method": "Extract", "status": "CANCELLED"})
    preprocessed = "qwen25vl_embed_preprocess_duration_seconds_count"
    cancelled_before = _sample(server, cancelled[0], **cancelled[1])
    preprocessed_before = _sample(server, preprocessed)

    async def scenario(aio: AsyncEmbeddingClient) -> Embeddings:
        task = asyncio.create_task(aio.extract(big_request, outputs=["lm_pooled_mean"]))
        # The server works on it: images decoded, the model running.
        await wait_until(lambda: _sample(server, preprocessed) > preprocessed_before)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: _sample(server, cancelled[0], **cancelled[1]) == cancelled_before + 1)
        assert _sample(server, "qwen25vl_embed_requests_in_progress", method="Extract") == 0
        return await aio.extract(_images(1)[0])

    assert run(scenario, server.address).num_images == 1


def test_cancelling_a_queued_call_frees_its_place_at_once(server: BackgroundServer, big_request: list[bytes]) -> None:
    preprocessed = "qwen25vl_embed_preprocess_duration_seconds_count"
    preprocessed_before = _sample(server, preprocessed)
    batches_before = server.pipeline.batcher.batches_run

    async def scenario(aio: AsyncEmbeddingClient) -> Embeddings:
        busy = asyncio.create_task(aio.extract(big_request, outputs=["lm_pooled_mean"]))
        await wait_until(lambda: _sample(server, preprocessed) > preprocessed_before)  # at the model
        queued = asyncio.create_task(aio.extract(_images(1)[0]))
        await wait_until(lambda: _sample(server, "qwen25vl_embed_queue_depth") == 1)  # waits behind it
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        await wait_until(lambda: _sample(server, "qwen25vl_embed_queue_depth") == 0)
        assert not busy.done()  # its place was freed while the model was still busy
        return await busy

    assert run(scenario, server.address).num_images == 16
    assert server.pipeline.batcher.batches_run == batches_before + 1  # the cancelled request never ran
