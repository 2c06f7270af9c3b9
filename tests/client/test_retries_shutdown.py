"""A call with the clients' default retries, cut by the server's shutdown mid-call, ends by its
deadline: the real tiny-model server on 127.0.0.1 holds the call's forward, then stops with a
short grace period; the client's retries find no server and the call ends UNAVAILABLE.

The bound (deadline plus a wide margin) is a correctness property, not a speed measurement: a
call that never ends is what it rules out (:class:`~qwen25vl_embed.retries.StreamRelease`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import grpc
import pytest

from qwen25vl_embed import AsyncEmbeddingClient, EmbeddingClient, EmbeddingError
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.scheduling.batcher import BatchingConfig
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import server_config
from ..rpc.test_faults import HOLD, OUTPUTS, ModelProbe, image_bytes

DEADLINE = 10.0
MARGIN = 20.0


def _blocking(kind: str) -> Callable[[str], None]:
    def call(address: str) -> None:
        with EmbeddingClient(address, timeout=DEADLINE) as client:
            if kind == "extract":
                client.extract(image_bytes(HOLD), outputs=OUTPUTS)
            else:
                list(client.extract_many([image_bytes(HOLD)], outputs=OUTPUTS))

    return call


def _asyncio(kind: str) -> Callable[[str], None]:
    async def main(address: str) -> None:
        async with AsyncEmbeddingClient(address, timeout=DEADLINE) as client:
            if kind == "extract":
                await client.extract(image_bytes(HOLD), outputs=OUTPUTS)
            else:
                [item async for item in client.extract_many([image_bytes(HOLD)], outputs=OUTPUTS)]

    return lambda address: asyncio.run(main(address))


@pytest.mark.parametrize("kind", ["extract", "extract_many"])
@pytest.mark.parametrize("client", [_blocking, _asyncio], ids=["blocking", "asyncio"])
def test_a_call_cut_by_shutdown_ends_by_its_deadline(
    extractor: Extractor, client: Callable[[str], Callable[[str], None]], kind: str
) -> None:
    server = BackgroundServer(extractor, server_config(batching=BatchingConfig(max_wait_ms=1))).start()
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            client(kind)(server.address)
            outcome.append(None)
        except BaseException as error:  # recorded for the assertions below
            outcome.append(error)

    # A daemon thread: were the call never to end, the test fails instead of hanging the run.
    caller = threading.Thread(target=run, daemon=True)
    with ModelProbe(extractor, hold=HOLD) as probe:
        started = time.monotonic()
        caller.start()
        assert probe.holding.wait(DEADLINE)
        stopper = threading.Thread(target=server.stop, args=(0.2,))
        stopper.start()
        caller.join(DEADLINE + MARGIN)
        ended = time.monotonic() - started
        probe.release()
        stopper.join(DEADLINE)
    assert not caller.is_alive(), f"the call was still waiting {ended:.1f} s after it started"
    assert ended < DEADLINE + MARGIN
    (error,) = outcome
    assert isinstance(error, EmbeddingError), repr(error)
    assert error.code == grpc.StatusCode.UNAVAILABLE
