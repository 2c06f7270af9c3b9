"""Graceful shutdown of the real ``qwen25vl-embed serve`` process on SIGTERM and SIGINT.

With calls in flight: a large Extract (about a second of model time) and an ExtractBatch stream
whose client keeps sending requests after the signal. On the signal, health turns NOT_SERVING,
new calls are refused with UNAVAILABLE, the calls in flight complete with their results within
the grace period, and the process exits with code 0 without waiting out the whole grace period.
"""

from __future__ import annotations

import functools
import io
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwen25vl_embed import EmbeddingClient, EmbeddingError, Embeddings
from qwen25vl_embed_server.rpc.harness import ServerProcess
from qwen25vl_embed_server.rpc.server import SERVICE_NAME

from ..helpers import assert_batched_close, noise_image, png_bytes

OUTPUTS = ["projected_pooled_mean", "lm_image_pooled_mean", "lm_last_token"]
SIGNALS = (signal.SIGTERM, signal.SIGINT)
GRACE = 20.0
TIMEOUT = 60.0
SMALL = [png_bytes(noise_image(56 + 28 * i, 56, seed=i)) for i in range(4)]


@functools.cache
def big_request() -> list[bytes]:
    """Four 896 px images: about 1.7 s of model time on 2 CPU cores."""
    return [png_bytes(noise_image(896, 896, seed)) for seed in range(4)]


@pytest.fixture(scope="module")
def references(client: EmbeddingClient) -> dict[str, Embeddings | list[Embeddings]]:
    """The same requests on the in-process server, which loads the same checkpoint."""
    return {
        "big": client.extract(big_request(), outputs=OUTPUTS),
        "small": [client.extract(data, outputs=OUTPUTS) for data in SMALL],
    }


class Started:
    """A ``serve`` process and its log."""

    def __init__(self, tiny_model_path: Path) -> None:
        self.log = io.StringIO()
        args = ["--model", str(tiny_model_path), "--device", "cpu", "--grace", str(GRACE)]
        self.server = ServerProcess(args, echo=self.log).start()


@pytest.fixture(scope="module")
def processes(tiny_model_path: Path) -> Iterator[dict[signal.Signals, Started]]:
    """One server process per signal, started together (each takes seconds to import torch)."""
    with ThreadPoolExecutor(2) as pool:
        starting = {sig: pool.submit(Started, tiny_model_path) for sig in SIGNALS}
    started = {sig: future.result() for sig, future in starting.items()}
    yield started
    for each in started.values():
        each.server.stop()


class HealthWatcher:
    """Streams health ``Watch`` updates of the embedding service into ``statuses`` (a thread)."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self._call = health_pb2_grpc.HealthStub(self._channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT
        )
        self.statuses: list[int] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self._call:
                self.statuses.append(response.status)
        except grpc.RpcError:
            pass  # cancelled by close(), or the server went away

    def wait_for(self, status: int, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while status not in self.statuses:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        # An open Watch is a call in flight too: ending it lets shutdown finish before the grace period.
        self._call.cancel()
        self._thread.join(TIMEOUT)
        self._channel.close()


def assert_matches(result: Embeddings, reference: Embeddings) -> None:
    for name in OUTPUTS:
        assert_batched_close(result[name], reference[name], name)


@pytest.mark.parametrize("sig", SIGNALS, ids=[sig.name for sig in SIGNALS])
def test_shutdown_on_a_signal_lets_calls_in_flight_finish_and_exits_0(
    processes: dict[signal.Signals, Started], references: dict[str, object], sig: signal.Signals
) -> None:
    server, log = processes[sig].server, processes[sig].log
    process = server.process
    assert process is not None
    signalled = threading.Event()

    def stream_images() -> Iterator[bytes]:
        """The ExtractBatch requests: one before the signal, the others after it."""
        yield SMALL[0]
        assert signalled.wait(TIMEOUT)
        for data in SMALL[1:]:
            time.sleep(0.2)
            yield data

    try:
        watcher = HealthWatcher(server.address)
        assert watcher.wait_for(health_pb2.HealthCheckResponse.SERVING)
        with EmbeddingClient(server.address, timeout=TIMEOUT) as sdk, ThreadPoolExecutor(2) as pool:
            stream = sdk.extract_many(stream_images(), outputs=OUTPUTS, concurrency=4)
            streamed = [next(stream)]  # the stream is open and served
            big = pool.submit(sdk.extract, big_request(), outputs=OUTPUTS)
            time.sleep(0.5)  # sent, and in preprocessing or on the model (checked below: it ends after the signal)
            process.send_signal(sig)
            sent_at = time.monotonic()

            assert watcher.wait_for(health_pb2.HealthCheckResponse.NOT_SERVING)
            watcher.close()
            time.sleep(0.2)
            with EmbeddingClient(server.address, timeout=10) as newcomer, pytest.raises(EmbeddingError) as refused:
                newcomer.extract(SMALL[0], outputs=OUTPUTS)
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(EmbeddingError) as refused_on_open_channel:
                sdk.info()
            assert refused_on_open_channel.value.code == grpc.StatusCode.UNAVAILABLE

            signalled.set()  # the stream's client sends its remaining requests now
            streamed.extend(stream)
            big_result = big.result(TIMEOUT)
            big_done_at = time.monotonic()
        code = process.wait(TIMEOUT)
        exited_at = time.monotonic()
    finally:
        signalled.set()
        server.stop()

    assert big_done_at > sent_at  # it was in flight when the signal came
    assert isinstance(big_result, Embeddings)
    assert_matches(big_result, references["big"])  # type: ignore[arg-type]
    assert len(streamed) == len(SMALL)
    for result, reference in zip(streamed, references["small"], strict=True):  # type: ignore[call-overload]
        assert isinstance(result, Embeddings)
        assert_matches(result, reference)
    assert code == 0
    assert exited_at - sent_at < GRACE  # done when the calls were, not at the end of the grace period
    assert "shutting down" in log.getvalue()
