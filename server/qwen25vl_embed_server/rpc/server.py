"""Assemble and run the gRPC server: embedding service, health, reflection, error mapping, metrics."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # missing from grpc-stubs
from grpc_reflection.v1alpha import reflection

from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed.v1 import embed_pb2_grpc as pb_grpc
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.loading import LoadOptions, check_options, load_model
from qwen25vl_embed_server.core.scheduling.model_thread import ModelThread, single_threaded_torch
from qwen25vl_embed_server.core.scheduling.pipeline import Pipeline
from qwen25vl_embed_server.rpc.auth import AuthConfig, BearerTokenInterceptor
from qwen25vl_embed_server.rpc.calls import ServiceConfig
from qwen25vl_embed_server.rpc.connections import ConnectionConfig
from qwen25vl_embed_server.rpc.encoded_responses import PassEncodedResponses
from qwen25vl_embed_server.rpc.error_mapping import ErrorMappingInterceptor
from qwen25vl_embed_server.rpc.exposure import exposure_warnings, is_loopback
from qwen25vl_embed_server.rpc.metrics import Metrics
from qwen25vl_embed_server.rpc.servicer import EmbeddingService
from qwen25vl_embed_server.rpc.tls import TLSServerConfig, server_credentials

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name


class ListenError(OSError):
    """The server cannot listen where it was told to (the port is in use, or the host is not an
    address of this machine)."""


@dataclass(frozen=True)
class ServerConfig:
    """Where to listen, the service, TLS and bearer tokens. Binds loopback unless told otherwise.

    ``service.pipeline.limits`` are the request limits (``max_request_bytes`` is gRPC's receive
    limit); ``tls`` None: plaintext; ``auth`` None: no token needed. ``metrics_port``: serve
    Prometheus metrics over plain HTTP on this port (0: any free port; None: no endpoint) at
    ``metrics_host`` (None: ``host``). ``connections``: keepalive, idle and age limits
    (:mod:`.connections`).
    """

    host: str = "127.0.0.1"
    port: int = 50051
    tls: TLSServerConfig | None = None
    auth: AuthConfig | None = None
    service: ServiceConfig = field(default_factory=ServiceConfig)
    grace_seconds: float = 10.0
    metrics_port: int | None = None
    metrics_host: str | None = None
    connections: ConnectionConfig = field(default_factory=ConnectionConfig)


class Companion(Protocol):
    """Another edge served by the same process, on the same loop, over the same pipeline and
    metrics (the HTTP API, :mod:`qwen25vl_embed_server.http.serving`)."""

    async def start(self, pipeline: Callable[[], Pipeline], metrics: Metrics) -> None:
        """Start serving; ``pipeline()`` raises ModelNotReadyError until the model is loaded."""

    async def stop(self, grace: float | None) -> None:
        """Stop, giving requests in progress ``grace`` seconds."""


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    service: EmbeddingService
    health: health_aio.HealthServicer
    companions: Sequence[Companion] = ()

    @property
    def metrics(self) -> Metrics:
        return self.service.metrics

    @property
    def metrics_port(self) -> int | None:
        """The bound port of the metrics endpoint; None without one."""
        return self.metrics.http_port

    async def mark_serving(self, extractor: Extractor, model_thread: ModelThread | None = None) -> None:
        """Attach the loaded model, run on ``model_thread`` (the one that loaded it), and report
        SERVING to health checks (on the server's loop), once a few sizes are measured (the
        pipeline's ``calibration_seconds``; :mod:`~.core.admission.calibration`)."""
        self.service.attach(extractor, model_thread)
        await self.service.calls.pipeline.calibrate()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight ones finish within ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        self.service.calls.stopping(grace)
        await asyncio.gather(self.server.stop(grace), *(companion.stop(grace) for companion in self.companions))
        # Every call has ended by now: a model run still in progress has nobody to answer.
        await self.service.close(wait=False)
        self.metrics.stop_http()


async def create_server(config: ServerConfig, companions: Sequence[Companion] = ()) -> RunningServer:
    """Start a server (health NOT_SERVING, no model yet) and return it with its bound port;
    ``companions`` (the HTTP API) start after it, over its pipeline and metrics.

    Raises :class:`ListenError` when it cannot listen at ``config.host``/``config.port``, or an
    OSError of a companion that cannot listen (the server stopped again).
    """
    check_bindable(config.host, config.port)
    # Authentication first: a refused call never reaches error mapping or the servicer.
    # Last (innermost): the serializers it installs are the ones the interceptors above rebuild with.
    interceptors: list[grpc.aio.ServerInterceptor] = [ErrorMappingInterceptor(), PassEncodedResponses()]  # type: ignore[type-arg]
    if config.auth is not None:
        interceptors.insert(0, BearerTokenInterceptor(config.auth.tokens))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", config.service.pipeline.limits.max_request_bytes),
            # gRPC sets SO_REUSEPORT by default on Linux: a second server on a port in use would
            # bind too and take a share of its connections. Off, that bind fails.
            ("grpc.so_reuseport", 0),
            *config.connections.grpc_options(),
        ],
    )
    service = EmbeddingService(config.service, Metrics(), encoded=True)
    pb_grpc.add_EmbeddingServiceServicer_to_server(service, server)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = _address(config.host, config.port)
    try:
        if config.tls is not None:
            port = server.add_secure_port(address, server_credentials(config.tls))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as err:  # what grpc raises when the bind fails
        raise ListenError(
            f"cannot listen on {address}: the port is in use, or the host is not an address here"
        ) from err
    authenticated = config.auth is not None or (config.tls is not None and config.tls.mutual)
    for warning in exposure_warnings(config.host, tls=config.tls is not None, auth=authenticated):
        log.warning("%s", warning)  # once it does listen there
    await server.start()
    if config.metrics_port is not None:
        host = config.metrics_host if config.metrics_host is not None else config.host
        try:
            metrics_port = service.metrics.serve_http(host, config.metrics_port)
        except OSError as err:
            await server.stop(None)
            raise ListenError(f"cannot serve metrics on {_address(host, config.metrics_port)}: {err}") from err
        log.info("metrics on http://%s/metrics", _address(host, metrics_port))
        if not is_loopback(host):
            log.warning("the metrics endpoint on %s is plain HTTP without authentication", host)
    running = RunningServer(server=server, port=port, service=service, health=health_servicer)
    for companion in companions:
        try:
            await companion.start(lambda: service.calls.pipeline, service.metrics)
        except BaseException:
            await running.stop(None)
            raise
        running.companions = (*running.companions, companion)
    return running


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_BIND_PROBLEMS = {
    errno.EADDRINUSE: "the port is in use",
    errno.EADDRNOTAVAIL: "the host is not an address of this machine",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
}


def check_bindable(host: str, port: int) -> None:
    """Raise :class:`ListenError` naming why ``host:port`` cannot be bound, before gRPC is asked.

    gRPC's C core reports a failed bind with a log line of its own on stderr before the server
    sees the error; a listening socket bound here first, with the options gRPC uses (SO_REUSEADDR,
    no SO_REUSEPORT), fails the same way without it. Like gRPC, a host whose every address fails
    is refused; one that binds on any of its addresses is left to gRPC. Port 0 checks the host.
    """
    address = _address(host, port)
    try:
        candidates = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ListenError(f"cannot listen on {address}: cannot resolve {host!r} ({err.strerror})") from err
    failures: list[OSError] = []
    for family, kind, protocol, _, sockaddr in candidates:
        try:  # creating the socket fails too, for an address family this machine lacks
            with socket.socket(family, kind, protocol) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(sockaddr)
                probe.listen(1)
        except OSError as err:
            failures.append(err)
        else:
            return
    if failures:
        first = failures[0]
        problem = _BIND_PROBLEMS.get(first.errno or 0, (first.strerror or str(first)).lower())
        raise ListenError(f"cannot listen on {address}: {problem}") from first


async def serve(config: ServerConfig, load: LoadOptions, companions: Sequence[Companion] = ()) -> None:
    """Run until SIGTERM/SIGINT: listen at once (``companions`` too), load the model, then report SERVING.

    Raises ValueError (a device or dtype that cannot work: before listening) or ModelLoadError
    (after the server stopped again, so that no gRPC object outlives the event loop).
    """
    check_options(load)
    running = await create_server(config, companions)
    log.info("listening on %s:%d (health NOT_SERVING until the model is loaded)", config.host, running.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    single_threaded_torch()  # this thread only serves: torch's threads are the model lanes'
    model_thread = ModelThread()  # loads the model, then runs it as the first lane (core/scheduling/model_lanes.py)
    loader = asyncio.ensure_future(model_thread.call(lambda: Extractor(load_model(load))))
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({loader, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if loader.done():
        if loader.exception() is not None:
            waiter.cancel()
            await running.stop(0)
            loader.result()  # raises the load error
        try:
            await running.mark_serving(loader.result(), model_thread)
        except ValueError:  # a memory limit that leaves no room beside the model
            waiter.cancel()
            await running.stop(0)
            raise
        log.info("serving %s on %s:%d", load.model, config.host, running.port)
        await waiter
    log.info("shutting down (grace %.0f s)", config.grace_seconds)
    await running.stop(config.grace_seconds)
    if running.service.calls.model_running:
        # Python joins the model lanes' threads at exit, which would wait for the forward (minutes for
        # a large one): leave now, as --grace promises.
        log.warning("a model run is still in progress; exiting without waiting for it")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    loader.cancel()
