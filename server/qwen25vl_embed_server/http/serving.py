"""The HTTP API served beside the gRPC server: uvicorn on the server's event loop, on the same
host, with the same TLS certificate and bearer tokens (a companion of
:func:`qwen25vl_embed_server.rpc.server.create_server`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import ssl
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from qwen25vl_embed_server.core.scheduling.pipeline import Pipeline
from qwen25vl_embed_server.http.app import create_app
from qwen25vl_embed_server.http.config import HTTPConfig, HTTPListenError
from qwen25vl_embed_server.http.running import Embedder
from qwen25vl_embed_server.rpc.auth import BearerTokens
from qwen25vl_embed_server.rpc.metrics import Metrics
from qwen25vl_embed_server.rpc.tls import TLSServerConfig

if TYPE_CHECKING:
    from qwen25vl_embed_server.rpc.server import ServerConfig

log = logging.getLogger(__name__)


class _Embedded(uvicorn.Server):
    """uvicorn inside a process whose signals are the gRPC server's (it installs none)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HTTPServer:
    """The HTTP API of one server process. ``host``, ``tls``, ``tokens`` and ``max_body_bytes``
    are the gRPC port's (its host, certificate, bearer tokens and receive limit)."""

    def __init__(
        self,
        config: HTTPConfig,
        host: str = "127.0.0.1",
        tls: TLSServerConfig | None = None,
        tokens: tuple[str, ...] | None = None,
        max_body_bytes: int = 64 << 20,
    ) -> None:
        self.config = config
        self.host = host
        self.tls = tls
        self.tokens = BearerTokens(tokens) if tokens else None
        self.max_body_bytes = max_body_bytes
        self.port: int | None = None
        self._server: _Embedded | None = None
        self._task: asyncio.Future[None] | None = None

    @classmethod
    def beside(cls, server: ServerConfig, config: HTTPConfig) -> HTTPServer:
        """The HTTP API of the gRPC server ``server``: its host, TLS, tokens and receive limit."""
        tokens = server.auth.tokens if server.auth is not None else None
        return cls(config, server.host, server.tls, tokens, server.service.pipeline.limits.max_request_bytes)

    @property
    def url(self) -> str:
        """``http(s)://host:port`` of the running API."""
        if self.port is None:
            raise RuntimeError("the HTTP API is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    async def start(self, pipeline: Callable[[], Pipeline], metrics: Metrics) -> None:
        """Listen and serve (on the running loop); requests wait for nothing: while ``pipeline()``
        raises ModelNotReadyError they are answered 503. Raises :class:`HTTPListenError`."""
        listening = _listen(self.host, self.config.port)
        app = create_app(Embedder(pipeline, metrics, self.config), self.tokens, self.max_body_bytes)
        settings = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", ws="none", server_header=False
        )
        settings.load()
        if self.tls is not None:
            settings.ssl = server_ssl_context(self.tls)
        self._server = _Embedded(settings)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[listening]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise HTTPListenError(f"the HTTP API did not start on {self.host}:{self.config.port}")
            await asyncio.sleep(0.01)
        self.port = int(listening.getsockname()[1])
        log.info("HTTP API at %s (OpenAI /v1/embeddings, Cohere /v2/embed, /pooling)", self.url)

    async def stop(self, grace: float | None) -> None:
        """Refuse new connections; requests in progress get ``grace`` seconds (None: none)."""
        if self._server is None or self._task is None:
            return
        self._server.config.timeout_graceful_shutdown = math.ceil(grace or 0)  # uvicorn takes whole seconds
        self._server.should_exit = True
        await self._task
        self._server = None


def _listen(host: str, port: int) -> socket.socket:
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, kind, protocol, _, sockaddr = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listening = socket.socket(family, kind, protocol)
    except OSError as err:
        raise HTTPListenError(f"cannot listen on {address} (--http-port): {err}") from err
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind(sockaddr)
        listening.listen(2048)
        listening.setblocking(False)
    except OSError as err:
        listening.close()
        raise HTTPListenError(f"cannot listen on {address} (--http-port): {err.strerror or err}") from err
    return listening


def server_ssl_context(tls: TLSServerConfig) -> ssl.SSLContext:
    """The server's TLS context from PEM bytes (mutual TLS with a client CA), HTTP/1.1 by ALPN."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # The ssl module reads a certificate chain and key from files only: a private folder, at once removed.
    with tempfile.TemporaryDirectory() as folder:
        cert, key = Path(folder, "cert.pem"), Path(folder, "key.pem")
        for path, data in ((cert, tls.cert_chain), (key, tls.private_key)):
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
        context.load_cert_chain(cert, key)
    if tls.client_ca is not None:
        context.load_verify_locations(cadata=tls.client_ca.decode("ascii"))
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["http/1.1"])
    return context
