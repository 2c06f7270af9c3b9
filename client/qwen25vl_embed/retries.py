"""Retries of the service's calls, done by gRPC itself: a service config with a retry policy.

Every call of ``EmbeddingService`` is idempotent (the model computes the same vectors again), so
both clients ask gRPC to retry the extraction calls (``Extract``, ``ExtractBatch``), by default,
when the server answers UNAVAILABLE (loading, shutting down, not reachable) or RESOURCE_EXHAUSTED
(at capacity): up to ``max_attempts`` attempts
in all, a random pause between attempts of at most ``initial_backoff`` seconds, then growing by
``backoff_multiplier`` up to ``max_backoff`` (gRPC's exponential backoff with full jitter).

Server pushback: a refusal whose trailing metadata carries ``grpc-retry-pushback-ms: N`` is
retried after exactly N milliseconds instead (the server says when it expects to have room);
``grpc-retry-pushback-ms: -1`` (or any value that is not a number) means "do not retry".

What gRPC never retries, whatever the policy:

- a call once the server has sent a response message (a stream that has begun is not replayed);
- a call whose request messages are larger than ``buffer_bytes``: gRPC keeps the messages sent
  until the call is committed, at most this many bytes per call. The default, 8 MiB, is below the
  server's default receive limit (64 MiB), so a request refused for its size (RESOURCE_EXHAUSTED
  without pushback) is never sent twice;
- a call whose deadline has passed: a retry counts against the call's own timeout.

A RESOURCE_EXHAUSTED without pushback under ``buffer_bytes`` is retried with backoff, like an
UNAVAILABLE: gRPC's policy cannot tell refusals apart by their metadata. A server that refuses a
request which will never fit (the device ran out of memory on it alone) should send pushback
``-1`` with it.

A blocking channel that retries also carries :class:`StreamRelease`, so that a streaming call
that fails always ends (see its docstring for the gRPC behaviour it works around).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

__all__ = ["DEFAULT_RETRY", "RetryPolicy", "StreamRelease", "retry_options"]

SERVICE = "qwen25vl_embed.v1.EmbeddingService"
RETRIED_METHODS = ("Extract", "ExtractBatch")
GRPC_MAX_ATTEMPTS = 5  # gRPC caps maxAttempts at 5 (larger values are treated as 5)
_SERVICE_CONFIG = "grpc.service_config"
_ENABLE_RETRIES = "grpc.enable_retries"
_BUFFER_SIZE = "grpc.per_rpc_retry_buffer_size"


@dataclass(frozen=True)
class RetryPolicy:
    """How gRPC retries the service's calls (see the module's docstring for what is never retried).

    Attributes:
        max_attempts: attempts in all, the first included: 2 to 5 (gRPC's own bound).
        initial_backoff: the longest pause before the first retry, in seconds (each pause is a
            random fraction of the current bound).
        max_backoff: the bound's largest value, in seconds.
        backoff_multiplier: the bound grows by this factor after each retry.
        status_codes: the status codes retried.
        buffer_bytes: request bytes gRPC keeps per call to resend it; a call that sends more is
            not retried.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    backoff_multiplier: float = 2.0
    status_codes: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
    buffer_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= GRPC_MAX_ATTEMPTS:
            raise ValueError(f"max_attempts must be 2 to {GRPC_MAX_ATTEMPTS}, got {self.max_attempts}")
        for name in ("initial_backoff", "max_backoff"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive seconds, got {getattr(self, name)}")
        if self.max_backoff < self.initial_backoff:
            raise ValueError(f"max_backoff ({self.max_backoff}) is below initial_backoff ({self.initial_backoff})")
        if not self.backoff_multiplier > 0:
            raise ValueError(f"backoff_multiplier must be positive, got {self.backoff_multiplier}")
        if not self.status_codes or not all(isinstance(c, grpc.StatusCode) for c in self.status_codes):
            raise ValueError(f"status_codes must be grpc.StatusCode values, at least one; got {self.status_codes!r}")
        if grpc.StatusCode.OK in self.status_codes:
            raise ValueError("status_codes cannot include OK")
        if self.buffer_bytes < 0:
            raise ValueError(f"buffer_bytes must be 0 or more, got {self.buffer_bytes}")

    def service_config(self) -> dict[str, Any]:
        """The gRPC service config (as a JSON object) that applies this policy to the extraction
        methods of ``qwen25vl_embed.v1.EmbeddingService`` (:data:`RETRIED_METHODS`). ``Info`` is
        answered from memory, and ``wait_ready`` polls it itself: a retry there would only hide
        the server's "still loading" until the call's deadline."""
        return {
            "methodConfig": [
                {
                    "name": [{"service": SERVICE, "method": method} for method in RETRIED_METHODS],
                    "retryPolicy": {
                        "maxAttempts": self.max_attempts,
                        "initialBackoff": _duration(self.initial_backoff),
                        "maxBackoff": _duration(self.max_backoff),
                        "backoffMultiplier": self.backoff_multiplier,
                        "retryableStatusCodes": [code.name for code in self.status_codes],
                    },
                }
            ]
        }

    def channel_options(self) -> list[tuple[str, Any]]:
        """The gRPC channel options that turn this policy on."""
        return [
            (_ENABLE_RETRIES, 1),
            (_SERVICE_CONFIG, json.dumps(self.service_config())),
            (_BUFFER_SIZE, self.buffer_bytes),
        ]


DEFAULT_RETRY = RetryPolicy()
"""The clients' default policy: 4 attempts, pauses from 0.2 s up to 5 s, UNAVAILABLE and
RESOURCE_EXHAUSTED, requests up to 8 MiB."""


def retry_options(options: Sequence[tuple[str, Any]], retry: RetryPolicy | None) -> list[tuple[str, Any]]:
    """``options`` with ``retry``'s channel options; ``retry`` None turns retries off.

    A service config among ``options`` without a ``methodConfig`` (e.g. one that only chooses
    ``round_robin``) gets the policy's; one with its own ``methodConfig`` is kept as it is, as is
    any retry setting given.

    Raises:
        ValueError: a ``grpc.service_config`` option that is not a JSON object.
    """
    given = list(options)
    names = {name for name, _ in given}
    if retry is None:
        return given if _ENABLE_RETRIES in names else [*given, (_ENABLE_RETRIES, 0)]
    merged = []
    for name, value in given:
        if name == _SERVICE_CONFIG:
            config = json.loads(value) if isinstance(value, str | bytes) else None
            if not isinstance(config, dict):
                raise ValueError(f"the {_SERVICE_CONFIG} option must be a JSON object, got {value!r}")
            if "methodConfig" not in config:
                value = json.dumps({**config, **retry.service_config()})
        merged.append((name, value))
    return [option for option in retry.channel_options() if option[0] not in names] + merged


class StreamRelease(
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Ends a blocking channel's response stream when its call fails, whatever gRPC's retries did.

    With retries on, gRPC's core (grpcio 1.85, its retry filter) can finish a call (its status
    received, its deadline timer gone with it) yet never complete the receive of its next
    message: an attempt answered without headers (a server that stops mid-call), then retries
    that cannot connect. The blocking client's response iterator waits for that message and
    never returns, past the call's deadline. The asyncio client is not affected.

    This interceptor cancels, at the core, every streaming call that ends with a status other
    than OK: cancelling a finished call changes nothing but completes the receive it still has
    pending, so the iterator raises the call's own status. It reaches into grpcio's call object
    (``_call``, the core call); where a grpcio version has none, it does nothing.
    """

    def intercept_unary_stream(
        self, continuation: Callable[[grpc.ClientCallDetails, Any], Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return _released(continuation(details, request))

    def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Iterator[Any]], Any],
        details: grpc.ClientCallDetails,
        request_iterator: Iterator[Any],
    ) -> Any:
        return _released(continuation(details, request_iterator))


def _released(call: Any) -> Any:
    cancel = getattr(getattr(call, "_call", None), "cancel", None)
    if cancel is None or not isinstance(call, grpc.Future):
        return call

    def finished(done: Any) -> None:
        if done.code() is not grpc.StatusCode.OK:
            cancel(grpc.StatusCode.CANCELLED.value[0], "the call has ended")

    call.add_done_callback(finished)
    return call


def _duration(seconds: float) -> str:
    """A protobuf Duration in the service config's JSON form, e.g. ``"0.2s"``."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"
