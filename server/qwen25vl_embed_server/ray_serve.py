"""Ray Serve: the same gRPC service behind Ray Serve's gRPC proxy, one model replica per GPU.

Clients keep the ``.proto``, the SDK and the Node.js example; only the address changes (the proxy's
gRPC port, 9000 by default). The proxy routes each call to a replica of the :class:`Embedder`
deployment, which runs the project's own :class:`~.service.EmbeddingService` on a model it loaded
itself: the same validation, preprocessing threads, dynamic batcher (token- and image-bounded,
deadline-aware, one bad request never fails its batch), chunking and error mapping as the plain
server. Ray's ``@serve.batch`` is not used: it bounds batches by count only and fails every
request of a batch with the batch.

Metadata: with one application on the cluster none is needed; with several, send
``application: <name>`` (``EmbeddingClient(..., metadata=[("application", "qwen25vl_embed")])``).

Configuration is a standard Ray Serve config file (``serve run FILE`` / ``serve deploy FILE`` /
KubeRay): ``applications[].args`` are :class:`EmbedderSettings`, and the deployment's
``ray_actor_options`` (``num_gpus: 1`` = one replica per GPU), ``autoscaling_config`` or
``num_replicas`` and ``max_ongoing_requests`` are Serve's own fields. See examples/ray/serve.yaml.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import yaml
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.schema import ServeDeploySchema

from qwen25vl_embed.v1 import embed_pb2 as pb

from .batcher import BatchingConfig
from .limits import Limits
from .status import log_failure, status_for

# torch and transformers are imported by the replicas only: Serve imports this module in its
# controller's build task too, where they would add seconds to every deployment.
if TYPE_CHECKING:
    from .loading import LoadOptions
    from .service import EmbeddingService, ServiceConfig

log = logging.getLogger(__name__)

APP_NAME = "qwen25vl_embed"
DEPLOYMENT_NAME = "Embedder"
SERVICER_FUNCTION = "qwen25vl_embed.v1.embed_pb2_grpc.add_EmbeddingServiceServicer_to_server"
"""What Serve's ``grpc_options.grpc_servicer_functions`` must list to expose this service."""

# Messages of an ExtractBatch stream buffered in the replica ahead of the proxy: beyond it the
# service stops writing, its window fills, and it stops reading requests (flow control holds).
_OUTBOX_MESSAGES = 64


class EmbedderSettings(BaseModel):
    """The application's ``args``: the model and the service, as ``qwen25vl-embed serve`` flags.

    Unknown keys are refused. The fields after ``max_pixels`` are those of
    :class:`~.service.ServiceConfig`; ``batching`` and ``limits`` take the fields of
    :class:`~.batcher.BatchingConfig` and :class:`~.limits.Limits`.
    ``limits.max_request_bytes`` does not apply: the proxy's receive limit is Ray's
    (``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE``, 2 GiB by default).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    device: str = "auto"
    dtype: str = "auto"
    min_pixels: int | None = None
    max_pixels: int | None = None
    chunk_bytes: int = 1 << 20  # service.DEFAULT_CHUNK_BYTES
    preprocess_workers: int = 4
    stream_window: int = 64
    batching: BatchingConfig = BatchingConfig()
    limits: Limits = Limits()
    max_in_flight: int | None = None

    def load_options(self) -> LoadOptions:
        from .loading import LoadOptions

        return LoadOptions(
            model=self.model,
            device=self.device,
            dtype=self.dtype,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
        )

    def service_config(self) -> ServiceConfig:
        from .service import ServiceConfig

        return ServiceConfig(
            chunk_bytes=self.chunk_bytes,
            preprocess_workers=self.preprocess_workers,
            stream_window=self.stream_window,
            batching=self.batching,
            limits=self.limits,
            max_in_flight=self.max_in_flight,
        )


class _ReplicaContext:
    """What :class:`EmbeddingService` uses of a ``grpc.aio.ServicerContext``, over Ray's context.

    Ray's proxy does not forward the caller's deadline (it enforces ``request_timeout_s`` and
    cancels the replica's call when the caller goes away), so ``time_remaining`` is None.
    ``write`` hands ExtractBatch's messages to ``sink``. Anything else goes to Ray's context.
    """

    def __init__(
        self, ray_context: RayServegRPCContext, sink: Callable[[pb.EmbeddingResponse], Awaitable[None]] | None = None
    ) -> None:
        self._ray_context = ray_context
        self._sink = sink

    def time_remaining(self) -> float | None:
        return None

    async def write(self, message: pb.EmbeddingResponse) -> None:
        if self._sink is None:
            raise RuntimeError("write() is only for streaming responses")
        await self._sink(message)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self._ray_context.set_code(code)
        self._ray_context.set_details(details)
        raise RuntimeError(details)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ray_context, name)


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=64)
class Embedder:
    """A replica: one model, one :class:`EmbeddingService`. Methods are named after the RPCs.

    ``max_ongoing_requests`` must stay at least ``batching.max_images``, or Serve's router keeps
    batches from growing.
    """

    # Ray Serve awaits an async constructor; the model loads off the replica's event loop.
    async def __init__(self, settings: EmbedderSettings) -> None:  # type: ignore[misc]
        from .extractor import Extractor
        from .loading import load_model
        from .service import EmbeddingService

        loaded = await asyncio.to_thread(load_model, settings.load_options())
        self._service: EmbeddingService = EmbeddingService(settings.service_config())
        self._service.attach(Extractor(loaded))  # the batcher lives on this (the replica's) loop

    async def Extract(  # noqa: N802 - the RPC's name
        self, request: pb.ImageRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.EmbeddingResponse]:
        context = cast(Any, _ReplicaContext(grpc_context))
        try:
            async for message in self._service.Extract(request, context):
                yield message
        except Exception as error:
            raise _with_status("Extract", request.request_id, error, grpc_context) from None

    async def ExtractBatch(  # noqa: N802 - the RPC's name
        self, requests: AsyncIterator[pb.ImageRequest], grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.EmbeddingResponse]:
        outbox: asyncio.Queue[pb.EmbeddingResponse] = asyncio.Queue(_OUTBOX_MESSAGES)
        context = cast(Any, _ReplicaContext(grpc_context, outbox.put))
        stream = asyncio.ensure_future(self._service.ExtractBatch(requests, context))
        getter: asyncio.Future[pb.EmbeddingResponse] | None = None
        try:
            while True:
                getter = asyncio.ensure_future(outbox.get())
                await asyncio.wait({getter, stream}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    continue
                getter.cancel()  # the stream ended: send what it wrote, then its outcome
                while not outbox.empty():
                    yield outbox.get_nowait()
                break
            stream.result()
        except Exception as error:
            raise _with_status("ExtractBatch", "", error, grpc_context) from None
        finally:
            if getter is not None:
                getter.cancel()
            stream.cancel()

    async def Info(  # noqa: N802 - the RPC's name
        self, request: pb.InfoRequest, grpc_context: RayServegRPCContext
    ) -> pb.InfoResponse:
        try:
            return await self._service.Info(request, cast(Any, _ReplicaContext(grpc_context)))
        except Exception as error:
            raise _with_status("Info", "", error, grpc_context) from None


def _with_status(method: str, request_id: str, error: Exception, context: RayServegRPCContext) -> Exception:
    """Map ``error`` as the plain server does; Ray's proxy sends the code and details set here.

    The exception to raise is a builtin: the proxy unpickles it, and one of this package's types
    would make the proxy import torch and transformers first (seconds, on the first error).
    """
    code, details = status_for(error)
    if code == grpc.StatusCode.INTERNAL:
        log_failure(method, request_id, error)
    context.set_code(code)
    context.set_details(details)
    return RuntimeError(f"{code.name}: {details}")


def app_builder(args: Mapping[str, Any]) -> serve.Application:
    """The application for Serve's config files (``import_path: ...ray_serve:app_builder``).

    Raises:
        pydantic.ValidationError: ``args`` are not valid :class:`EmbedderSettings`.
    """
    return build_app(EmbedderSettings.model_validate(dict(args)))


def build_app(settings: EmbedderSettings) -> serve.Application:
    """The application in code, e.g. ``serve.run(build_app(EmbedderSettings(model=...)))``."""
    application: serve.Application = cast(Any, Embedder).bind(settings)  # a Deployment; typed as the class
    return application


def load_config(source: str | Path | Mapping[str, Any]) -> ServeDeploySchema:
    """A Serve config (a YAML file's path, or its content) exposing this gRPC service.

    The servicer function is added to ``grpc_options.grpc_servicer_functions`` when missing.

    Raises:
        OSError: the file cannot be read.
        pydantic.ValidationError: not a valid Serve config.
    """
    raw = dict(source) if isinstance(source, Mapping) else yaml.safe_load(Path(source).read_text())
    grpc_options = dict(raw.get("grpc_options") or {})
    functions = list(grpc_options.get("grpc_servicer_functions") or [])
    if SERVICER_FUNCTION not in functions:
        functions.append(SERVICER_FUNCTION)
    raw["grpc_options"] = {**grpc_options, "grpc_servicer_functions": functions}
    return ServeDeploySchema.model_validate(raw)


def deploy(config: ServeDeploySchema, timeout_s: float = 900.0) -> None:
    """Start Serve (proxies as configured) and deploy ``config``'s applications, as ``serve run``
    does; return once they are RUNNING. Needs ``ray.init()`` first (or a ``RAY_ADDRESS``).

    Raises:
        RuntimeError: an application failed to deploy, or was not running within ``timeout_s``.
    """
    # Serve's public API deploys Application objects; a config file goes through the same
    # (private) client that `serve run` and `serve deploy` use, so all three behave alike.
    from ray.serve._private.api import serve_start
    from ray.serve.config import gRPCOptions

    client = serve_start(
        http_options=config.http_options.model_dump(),
        grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
        proxy_location=config.proxy_location,
    )
    client.deploy_apps(config)
    wait_until_running([app.name for app in config.applications], timeout_s)


def wait_until_running(names: list[str], timeout_s: float) -> None:
    """Poll Serve until the applications ``names`` are RUNNING.

    Raises:
        RuntimeError: one failed to deploy, or they were not all running within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        applications = serve.status().applications
        states = {name: applications.get(name) for name in names}
        failed = {name: app for name, app in states.items() if app is not None and app.status == "DEPLOY_FAILED"}
        if failed:
            messages = "; ".join(f"{name}: {app.message}" for name, app in failed.items())
            raise RuntimeError(f"deploying failed: {messages}")
        if all(app is not None and app.status == "RUNNING" for app in states.values()):
            return
        if time.monotonic() > deadline:
            pending = {name: app.status if app else "NOT_STARTED" for name, app in states.items()}
            raise RuntimeError(f"not running after {timeout_s:.0f} s: {pending}")
        time.sleep(0.5)


def serve_config_file(path: str | Path, address: str | None = None) -> None:
    """``qwen25vl-embed serve-ray --config FILE``: deploy, then serve until SIGTERM/SIGINT.

    Connects to the Ray cluster at ``address`` (or ``RAY_ADDRESS``), else starts a local one.
    On a signal, Serve is shut down (as ``serve run`` does on Ctrl-C).
    """
    import ray

    config = load_config(path)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=address)
    # After ray.init, whose own SIGTERM handler would otherwise abort the process at exit.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        deploy(config)
        log.info(
            "serving %s through Ray Serve's gRPC proxy on port %d",
            ", ".join(app.name for app in config.applications),
            config.grpc_options.port,
        )
        stop.wait()
        log.info("shutting down Serve")
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()


__all__ = [
    "APP_NAME",
    "SERVICER_FUNCTION",
    "Embedder",
    "EmbedderSettings",
    "app_builder",
    "build_app",
    "deploy",
    "load_config",
    "serve_config_file",
    "wait_until_running",
]
