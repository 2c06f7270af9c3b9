"""Ray Serve: the same gRPC service behind Ray Serve's gRPC proxy, one model replica per GPU.

Clients keep the ``.proto``, the SDK and the Node.js example; only the address changes (the proxy's
gRPC port, 9000 by default). The proxy routes each call to a replica of the ``Embedder``
deployment (:class:`EmbedderReplica`), which runs the project's own
:class:`~qwen25vl_embed_server.rpc.calls.EmbeddingCalls` on a model it loaded itself: the same
validation, preprocessing threads, dynamic batcher (token- and image-bounded, deadline-aware, one
bad request never fails its batch), chunking and error mapping as the plain server. Ray's
``@serve.batch`` is not used: it bounds batches by count only and fails every request of a batch
with the batch.

Metadata: with one application on the cluster none is needed; with several, send
``application: <name>`` (``EmbeddingClient(..., metadata=[("application", "qwen25vl_embed")])``).

Configuration is a standard Ray Serve config file (``serve run FILE`` / ``serve deploy FILE`` /
KubeRay, or :mod:`.deploy`): ``applications[].args`` are :class:`EmbedderSettings`, and the
deployment's ``ray_actor_options`` (``num_gpus: 1`` = one replica per GPU),
``autoscaling_config`` or ``num_replicas`` and ``max_ongoing_requests`` are Serve's own fields.
See examples/ray/serve.yaml.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any, cast

import grpc
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed_server.core import defaults
from qwen25vl_embed_server.core.admission.limits import Limits
from qwen25vl_embed_server.core.retrieval.adapter_spec import AdapterSpec, check_adapter_name
from qwen25vl_embed_server.core.scheduling.batcher import BatchingConfig
from qwen25vl_embed_server.rpc.error_mapping import log_failure, status_for

# torch and transformers are imported by the replicas only: Serve imports this module in its
# controller's build task too, where they would add seconds to every deployment.
if TYPE_CHECKING:
    from qwen25vl_embed_server.core.model.loading import LoadOptions
    from qwen25vl_embed_server.rpc.calls import EmbeddingCalls, ServiceConfig
    from qwen25vl_embed_server.rpc.messages import Response  # messages here: these calls are not encoded

log = logging.getLogger(__name__)

APP_NAME = "qwen25vl_embed"
DEPLOYMENT_NAME = "Embedder"
SERVICER_FUNCTION = "qwen25vl_embed.v1.embed_pb2_grpc.add_EmbeddingServiceServicer_to_server"
"""What Serve's ``grpc_options.grpc_servicer_functions`` must list to expose this service."""

# Messages of an ExtractBatch stream buffered in the replica ahead of the proxy: beyond it the
# replica stops writing, its window fills, and it stops reading requests (flow control holds).
_OUTBOX_MESSAGES = 64
# How a refusal tells a Serve user to raise a limit: the key in the application's args.
_LIMIT_HINTS = {item.name: f"limits.{item.name} in the application's args" for item in fields(Limits)}


class EmbedderSettings(BaseModel):
    """The application's ``args``: the model and the service, as ``qwen25vl-embed serve`` flags.

    Unknown keys are refused. ``batching`` and ``limits`` take the fields of
    :class:`~qwen25vl_embed_server.core.scheduling.batcher.BatchingConfig` and
    :class:`~qwen25vl_embed_server.core.admission.limits.Limits`. ``limits.max_request_bytes`` does not
    apply: the proxy's receive limit is Ray's (``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE``, 2 GiB by default).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = defaults.DEFAULT_MODEL
    device: str = defaults.DEFAULT_DEVICE
    dtype: str = defaults.DEFAULT_DTYPE
    fp32_matmul: str = defaults.DEFAULT_FP32_MATMUL
    bf16_arithmetic: str = defaults.DEFAULT_BF16_ARITHMETIC
    min_pixels: int | None = None
    max_pixels: int | None = None
    chunk_bytes: int = defaults.DEFAULT_CHUNK_BYTES
    preprocess_workers: int = defaults.DEFAULT_PREPROCESS_WORKERS
    stream_window: int = defaults.DEFAULT_STREAM_WINDOW
    batching: BatchingConfig = BatchingConfig()
    limits: Limits = Limits()
    max_in_flight: int | None = None
    memory_limit: int | None = None
    """Bytes the replica's process may hold; the budgets left unset derive from it (None: each
    budget's default)."""
    max_tokens_in_flight: int | None = None
    max_pixels_in_flight: int | None = None
    max_result_bytes: int | None = None
    max_request_bytes_in_flight: int | None = None
    trim_after_bytes: int | None = None
    send_timeout_seconds: float = defaults.DEFAULT_SEND_TIMEOUT_SECONDS
    adapters: dict[str, str] = {}
    """Retrieval adapters served on the ``model`` base, name -> folder (``serve --adapter NAME=PATH``)."""

    def load_options(self) -> LoadOptions:
        from qwen25vl_embed_server.core.model.loading import LoadOptions

        return LoadOptions(
            model=self.model,
            device=self.device,
            dtype=self.dtype,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            fp32_matmul=self.fp32_matmul,
            bf16_arithmetic=self.bf16_arithmetic,
            adapters=tuple(AdapterSpec(check_adapter_name(name), path) for name, path in self.adapters.items()),
        )

    def service_config(self) -> ServiceConfig:
        from qwen25vl_embed_server.core.scheduling.pipeline import PipelineConfig
        from qwen25vl_embed_server.rpc.calls import ServiceConfig

        return ServiceConfig(
            chunk_bytes=self.chunk_bytes,
            stream_window=self.stream_window,
            send_timeout_seconds=self.send_timeout_seconds,
            pipeline=PipelineConfig(
                preprocess_workers=self.preprocess_workers,
                batching=self.batching,
                limits=self.limits,
                max_in_flight=self.max_in_flight,
                limit_hints=_LIMIT_HINTS,
                max_tokens_in_flight=self.max_tokens_in_flight,
                max_pixels_in_flight=self.max_pixels_in_flight,
                max_result_bytes=self.max_result_bytes,
                memory_limit=self.memory_limit,
                max_request_bytes_in_flight=self.max_request_bytes_in_flight,
                trim_after_bytes=self.trim_after_bytes,
            ),
        )


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=64)
class EmbedderReplica:
    """A replica: one model, one :class:`EmbeddingCalls`. Methods are named after the RPCs.

    Ray's proxy does not forward the caller's deadline (it enforces ``request_timeout_s`` and
    cancels the replica's call when the caller goes away), so the calls run without one: nothing is
    refused by deadline, and a replica runs no calibration for it (``serve --calibration-seconds``).
    ``max_ongoing_requests`` must stay at least ``batching.max_images``, or Serve's router keeps
    batches from growing.
    """

    # Ray Serve awaits an async constructor; the model loads off the replica's event loop.
    async def __init__(self, settings: EmbedderSettings) -> None:  # type: ignore[misc]
        from qwen25vl_embed_server.core.model.extractor import Extractor
        from qwen25vl_embed_server.core.model.loading import load_model
        from qwen25vl_embed_server.core.scheduling.model_thread import ModelThread
        from qwen25vl_embed_server.rpc.calls import EmbeddingCalls

        # The thread that loads the model runs it too (see core/scheduling/model_thread.py).
        model_thread = ModelThread()
        extractor = await model_thread.call(lambda: Extractor(load_model(settings.load_options())))
        self._calls: EmbeddingCalls = EmbeddingCalls(settings.service_config())
        self._calls.attach(extractor, model_thread)  # the batcher lives on this (the replica's) loop

    async def Extract(  # noqa: N802 - the RPC's name
        self, request: pb.ImageRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[Response]:
        try:
            async for message in self._calls.extract(request, deadline=None):
                yield message
        except Exception as error:
            raise _with_status("Extract", request.request_id, error, grpc_context) from None

    async def ExtractBatch(  # noqa: N802 - the RPC's name
        self, requests: AsyncIterator[pb.ImageRequest], grpc_context: RayServegRPCContext
    ) -> AsyncIterator[Response]:
        outbox: asyncio.Queue[Response] = asyncio.Queue(_OUTBOX_MESSAGES)
        stream = asyncio.ensure_future(self._calls.extract_batch(requests, None, outbox.put))
        getter: asyncio.Future[Response] | None = None
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
            return self._calls.info()
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
    """The application for Serve's config files (``import_path: ...deployment:app_builder``).

    Raises:
        pydantic.ValidationError: ``args`` are not valid :class:`EmbedderSettings`.
    """
    return build_app(EmbedderSettings.model_validate(dict(args)))


def build_app(settings: EmbedderSettings) -> serve.Application:
    """The application in code, e.g. ``serve.run(build_app(EmbedderSettings(model=...)))``."""
    application: serve.Application = cast(Any, EmbedderReplica).bind(settings)  # a Deployment; typed as the class
    return application


__all__ = [
    "APP_NAME",
    "DEPLOYMENT_NAME",
    "SERVICER_FUNCTION",
    "EmbedderReplica",
    "EmbedderSettings",
    "app_builder",
    "build_app",
]
