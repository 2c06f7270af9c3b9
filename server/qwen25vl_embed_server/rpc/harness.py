"""Run a server beside your code: on a thread of this process, or as a child process.

For tests, benchmarks, demos and notebooks.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import IO, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.scheduling.pipeline import Pipeline
from qwen25vl_embed_server.rpc.server import Companion, RunningServer, ServerConfig, create_server
from qwen25vl_embed_server.rpc.servicer import EmbeddingService


class BackgroundServer:
    """A real gRPC server on its own event loop thread, already SERVING ``extractor``;
    ``companions`` (the HTTP API) served beside it on that loop.

    >>> with BackgroundServer(extractor, ServerConfig(port=0)) as server:
    ...     client = EmbeddingClient(server.address)
    """

    def __init__(
        self, extractor: Extractor, config: ServerConfig | None = None, companions: Sequence[Companion] = ()
    ) -> None:
        self._extractor = extractor
        self._config = config or ServerConfig(port=0)
        self._companions = tuple(companions)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-server", daemon=True)
        self._running: RunningServer | None = None

    @property
    def address(self) -> str:
        """``host:port`` to connect to."""
        if self._running is None:
            raise RuntimeError("the server is not started")
        return f"{self._config.host}:{self._running.port}"

    @property
    def service(self) -> EmbeddingService:
        if self._running is None:
            raise RuntimeError("the server is not started")
        return self._running.service

    @property
    def pipeline(self) -> Pipeline:
        """The request pipeline of the running server (its batcher, its queue)."""
        return self.service.calls.pipeline

    def start(self) -> BackgroundServer:
        self._thread.start()
        self._running = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()
        return self

    async def _start(self) -> RunningServer:
        running = await create_server(self._config, self._companions)
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


class Writer(Protocol):
    """Anything with ``write(str)``: a text stream, or an object that decorates the lines."""

    def write(self, text: str, /) -> object: ...


class ServerProcess:
    """``qwen25vl-embed serve ARGS`` in a child process, ready (health SERVING) on entry.

    The port is chosen by the server (``--port 0``) and read from its log; the log is echoed to
    ``echo`` (anything with ``write(str)``, or None to drop it); ``env`` is added to this process's
    environment. Exit sends SIGTERM and waits.
    """

    def __init__(
        self,
        args: Sequence[str],
        echo: Writer | None = None,
        timeout: float = 300,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._command = [sys.executable, "-m", "qwen25vl_embed_server.cli", "serve", "--port", "0", *args]
        self._env = dict(env or {})
        self._echo = echo
        self._timeout = timeout
        self.process: subprocess.Popen[str] | None = None
        self.address = ""

    def start(self) -> ServerProcess:
        env = {**os.environ, **self._env, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(self._command, stderr=subprocess.PIPE, text=True, env=env)
        assert self.process.stderr is not None
        deadline = time.monotonic() + self._timeout
        for line in self.process.stderr:
            self._write(line)
            if match := re.search(r"listening on (\S+:\d+)", line):
                self.address = match.group(1)
                break
        else:
            raise RuntimeError(f"the server exited with code {self.process.wait()} before listening")
        threading.Thread(target=self._drain, args=(self.process.stderr,), daemon=True).start()
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while health.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.SERVING:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("the server did not become healthy")
                time.sleep(0.1)
        return self

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code (killed after ``timeout`` seconds)."""
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def _drain(self, stream: IO[str]) -> None:
        for line in stream:
            self._write(line)

    def _write(self, line: str) -> None:
        if self._echo is not None:
            self._echo.write(line)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
