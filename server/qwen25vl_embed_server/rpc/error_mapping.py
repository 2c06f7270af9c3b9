"""Domain errors -> gRPC status codes, in one place: a server interceptor.

InvalidInputError -> INVALID_ARGUMENT with its message; OverloadedError and
OutOfMemoryError (device or host, model run or preprocessing) and SlowConsumerError -> RESOURCE_EXHAUSTED;
DeadlineExceededError -> DEADLINE_EXCEEDED;
an OverloadedError says when to retry in trailing metadata (:func:`trailing_metadata`:
``grpc-retry-pushback-ms`` as gRPC's retry policy reads it, ``retry-after-ms`` for a new call);
ModelNotReadyError -> UNAVAILABLE; anything else -> INTERNAL with a generic message, the traceback logged on the server.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from qwen25vl_embed_server.core.errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelNotReadyError,
    OutOfMemoryError,
    OverloadedError,
    SlowConsumerError,
    quoted,
)
from qwen25vl_embed_server.rpc.messages import Undecodable, tolerant

log = logging.getLogger(__name__)

MODEL_LOADING = (
    "the model is still loading; wait for it with wait_ready(timeout) in the SDK or --wait SECONDS on the CLI, "
    "or retry later"
)
"""UNAVAILABLE's message while the server listens and its model loads: it names how to wait."""


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and caller-facing message for ``error``."""
    if isinstance(error, InvalidInputError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, (OverloadedError, OutOfMemoryError, SlowConsumerError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, DeadlineExceededError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(error)
    if isinstance(error, ModelNotReadyError):
        return grpc.StatusCode.UNAVAILABLE, str(error) or MODEL_LOADING
    return grpc.StatusCode.INTERNAL, "internal server error; the server log has the details"


PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""The trailing metadata key of the retry hint (gRPC's retry policy waits that long before retrying)."""

RETRY_AFTER_KEY = "retry-after-ms"
"""The trailing metadata key of when a new call is expected to be admitted, where retrying within
the refused call cannot help (the SDK's ``EmbeddingError.retry_after``)."""


def trailing_metadata(error: BaseException) -> tuple[tuple[str, str], ...]:
    """The trailing metadata sent with ``error``'s status.

    - a queue or memory refusal that will pass later: its retry hint as ``grpc-retry-pushback-ms``,
      which gRPC's retry policy honours within the same call;
    - a deadline refusal: ``grpc-retry-pushback-ms: -1`` (a retry within the same call has its
      deadline that much closer and the same work ahead, so it cannot be admitted either), and the
      hint as ``retry-after-ms``: when a new call with as long a deadline is expected to pass;
    - a refusal that never passes as sent (the request alone is past its deadline, or more than the
      memory limit lets one request hold; it ran out of memory alone; its caller read too slowly):
      ``-1``, do not retry.
    """
    if isinstance(error, (OutOfMemoryError, SlowConsumerError)):
        return ((PUSHBACK_KEY, "-1"),)  # the same request, sent again, meets the same fate
    if not isinstance(error, OverloadedError):
        return ()
    if error.retry_after is None:
        return ((PUSHBACK_KEY, "-1"),) if error.reason in ("deadline", "memory") else ()
    milliseconds = str(max(0, round(error.retry_after * 1000)))
    if error.reason == "deadline":
        return ((PUSHBACK_KEY, "-1"), (RETRY_AFTER_KEY, milliseconds))
    return ((PUSHBACK_KEY, milliseconds),)


def log_failure(method: str, request_id: str, error: BaseException) -> None:
    """Log a failed call: the traceback for INTERNAL at ERROR; the caller's mistakes at DEBUG only,
    as the request log (``qwen25vl_embed_server.requests``) already has one INFO line per request."""
    code, message = status_for(error)
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s [%s] failed", quoted(method), quoted(request_id), exc_info=error)
    else:
        log.debug("%s [%s] -> %s: %s", quoted(method), quoted(request_id), code.name, message)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], method: str, error: Exception) -> None:
    log_failure(method, "", error)
    await context.abort(*status_for(error), trailing_metadata=trailing_metadata(error))


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps handlers so domain errors become status codes.

    Covers unary-unary, unary-stream and coroutine stream-stream handlers (those that write with
    ``context.write``); async-generator stream-stream handlers pass through unchanged. The
    handlers it wraps parse requests with :func:`~.messages.tolerant`: a malformed request message
    is INVALID_ARGUMENT (a stream handler receives an :class:`~.messages.Undecodable` in its place).
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            # A coroutine that writes with context.write (health's Watch) is not an async iterator.
            wrap = _wrap_unary if inspect.iscoroutinefunction(handler.unary_stream) else _wrap_stream
            return grpc.unary_stream_rpc_method_handler(
                wrap(handler.unary_stream, method),
                request_deserializer=tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None and inspect.iscoroutinefunction(handler.stream_stream):
            return grpc.stream_stream_rpc_method_handler(
                _wrap_unary(handler.stream_stream, method),
                request_deserializer=tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler


def _wrap_unary(behavior: Any, method: str) -> Any:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort(context, method, error)

    return wrapped


def _wrap_stream(behavior: Any, method: str) -> Any:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort(context, method, error)

    return wrapped
