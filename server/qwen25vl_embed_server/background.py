"""Run a server on a background thread of this process (tests, benchmarks, notebooks)."""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

from .extractor import Extractor
from .server import RunningServer, ServerConfig, create_server


class BackgroundServer:
    """A real gRPC server on its own event loop thread, already SERVING ``extractor``.

    >>> with BackgroundServer(extractor, ServerConfig(port=0)) as server:
    ...     client = EmbeddingClient(server.address)
    """

    def __init__(self, extractor: Extractor, config: ServerConfig | None = None) -> None:
        self._extractor = extractor
        self._config = config or ServerConfig(port=0)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-server", daemon=True)
        self._running: RunningServer | None = None

    @property
    def address(self) -> str:
        """``host:port`` to connect to."""
        if self._running is None:
            raise RuntimeError("the server is not started")
        return f"{self._config.host}:{self._running.port}"

    def start(self) -> BackgroundServer:
        self._thread.start()
        self._running = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()
        return self

    async def _start(self) -> RunningServer:
        running = await create_server(self._config)
        await running.mark_serving(self._extractor)
        return running

    def stop(self, grace: float | None = None) -> None:
        if self._running is not None:
            asyncio.run_coroutine_threadsafe(self._running.stop(grace), self._loop).result()
            self._running = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
