"""The gRPC servicer: the generated service's methods over :class:`~.calls.EmbeddingCalls`.

Pipeline per request: cheap validation on the event loop; image decoding and the processor on a
pool of preprocessing threads; the model in the batcher's batches on the one device thread;
response messages built as they are sent. Failures raise domain errors, which
:class:`~.error_mapping.ErrorMappingInterceptor` turns into status codes.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed.v1 import embed_pb2_grpc as pb_grpc
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.scheduling.model_thread import ModelThread
from qwen25vl_embed_server.rpc.calls import EmbeddingCalls, ServiceConfig
from qwen25vl_embed_server.rpc.messages import Response
from qwen25vl_embed_server.rpc.metrics import Metrics

Context = grpc.aio.ServicerContext[pb.ImageRequest, Response]  # messages, or their bytes (encoded)


class EmbeddingService(pb_grpc.EmbeddingServiceServicer):
    """Serves Extract, ExtractBatch and Info once :meth:`attach` gave it a model.

    ``encoded``: responses with tensors are written as their serialized bytes (one copy of the
    tensor data instead of four); the server must then pass bytes through its response serializer
    (:class:`~.encoded_responses.PassEncodedResponses`, as :func:`~.server.create_server` does).
    """

    def __init__(
        self, config: ServiceConfig | None = None, metrics: Metrics | None = None, encoded: bool = False
    ) -> None:
        self.calls = EmbeddingCalls(config or ServiceConfig(), metrics, encoded)

    @property
    def metrics(self) -> Metrics:
        return self.calls.metrics

    def attach(self, extractor: Extractor, model_thread: ModelThread | None = None) -> None:
        """Start serving ``extractor`` on ``model_thread`` (call on the server's event loop)."""
        self.calls.attach(extractor, model_thread)

    async def close(self, wait: bool = True) -> None:
        await self.calls.close(wait)

    # A coroutine that writes with context.write, so that each write can be timed: a caller that
    # reads nothing is ended after the send timeout (see ServiceConfig).
    async def Extract(  # type: ignore[override]  # noqa: N802 - the RPC's name
        self, request: pb.ImageRequest, context: Context
    ) -> None:
        messages = self.calls.extract(request, _deadline(context))
        try:
            async for message in messages:
                await self.calls.send(context.write, message)
        finally:
            await messages.aclose()

    # A coroutine that writes with context.write (grpc.aio allows it; the stubs expect an iterator).
    async def ExtractBatch(  # type: ignore[override]  # noqa: N802 - the RPC's name
        self, request_iterator: AsyncIterator[pb.ImageRequest], context: Context
    ) -> None:
        await self.calls.extract_batch(request_iterator, _deadline(context), context.write)

    async def Info(  # noqa: N802 - the RPC's name
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext[pb.InfoRequest, pb.InfoResponse]
    ) -> pb.InfoResponse:
        return self.calls.info()


def _deadline(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
