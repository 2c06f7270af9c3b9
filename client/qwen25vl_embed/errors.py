"""The SDK's exception for failed calls, carrying the gRPC status code.

Which errors come from where:

- :class:`EmbeddingError`: the server (or the transport) answered with a failure status.
- ``ValueError`` / ``TypeError`` / ``OSError`` (``FileNotFoundError`` included): ``extract``'s
  arguments were refused here, before anything was sent.
- :class:`LocalRequestError`: the same refusal for one input of ``extract_many``, which reports
  it in that input's place; an :class:`EmbeddingError` (so that ``errors="return"`` yields one
  type), told apart by its class, ``sent`` False and the original exception as ``cause``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc

__all__ = [
    "EmbeddingError",
    "LocalRequestError",
    "ReadyWait",
    "from_rpc_error",
    "not_ready_error",
    "still_loading",
]


class EmbeddingError(Exception):
    """A call to the embedding service failed.

    ``code`` is the gRPC status code (``INVALID_ARGUMENT`` for a bad request, ``UNAVAILABLE``
    while the model loads or the server is unreachable, ``RESOURCE_EXHAUSTED`` when the server
    refuses work it cannot take now, ``DEADLINE_EXCEEDED`` after a timeout, ``INTERNAL`` for a
    server fault) and ``details`` the server's message. ``retry_after``: seconds after which the
    server expects a new call to be admitted, where it said so (a refusal by deadline or load);
    None otherwise.
    """

    def __init__(self, code: grpc.StatusCode, details: str, retry_after: float | None = None) -> None:
        # All go to Exception.args so that the error pickles and re-raises across processes.
        super().__init__(code, details, retry_after)
        self.code = code
        self.details = details
        self.retry_after = retry_after

    sent = True
    """False for a :class:`LocalRequestError`: the request never reached the server."""

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class LocalRequestError(EmbeddingError):
    """One input of ``extract_many`` that could not be turned into a request here (a missing or
    empty file, an unsupported image type): never sent. ``cause`` is the original exception;
    ``code`` is INVALID_ARGUMENT, what the server would have said of bad input."""

    sent = False

    def __init__(self, details: str, cause: BaseException | None = None) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, details)
        self.cause = cause

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.details, self.cause))

    def __str__(self) -> str:
        return f"{self.code.name} (refused here, not sent): {self.details}"


def from_rpc_error(err: grpc.RpcError) -> EmbeddingError:
    """The :class:`EmbeddingError` for a ``grpc.RpcError`` raised by a sync or asyncio call."""
    # The base grpc.RpcError has no code()/details() at runtime; the errors that calls raise do.
    code_of = getattr(err, "code", None)
    code = code_of() if callable(code_of) else None
    details_of = getattr(err, "details", None)
    details = details_of() if callable(details_of) else None
    return EmbeddingError(
        code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN,
        details if isinstance(details, str) else str(err),
        _retry_after(err),
    )


def _retry_after(err: grpc.RpcError) -> float | None:
    """The server's hint of when to call again, in seconds: ``retry-after-ms`` (a new call), else a
    non-negative ``grpc-retry-pushback-ms`` (the retry policy's hint) in the trailing metadata."""
    trailing_of = getattr(err, "trailing_metadata", None)
    trailing = trailing_of() if callable(trailing_of) else None
    hints = {str(key): str(value) for key, value in (trailing or ())}
    for key in ("retry-after-ms", "grpc-retry-pushback-ms"):
        try:
            milliseconds = int(hints[key])
        except (KeyError, ValueError):
            continue
        if milliseconds >= 0:
            return milliseconds / 1000
    return None


# While a server loads its model it answers UNAVAILABLE; a call that found no server in time
# ends in DEADLINE_EXCEEDED. Both mean "not ready yet" to wait_ready.
_NOT_READY = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def still_loading(error: EmbeddingError) -> bool:
    """True for the errors that ``wait_ready`` waits through."""
    return error.code in _NOT_READY


def not_ready_error(target: str, timeout: float, last: EmbeddingError | None) -> EmbeddingError:
    """The DEADLINE_EXCEEDED error of a ``wait_ready`` that ran out of time."""
    seen = f"; last answer: {last}" if last is not None else ""
    return EmbeddingError(
        grpc.StatusCode.DEADLINE_EXCEEDED, f"the server at {target} was not ready within {timeout:g} s{seen}"
    )


class ReadyWait:
    """The bookkeeping of one ``wait_ready``: its deadline, the last failure, when to give up.

    Both clients loop ``for remaining in wait.attempts()``: an Info call with ``remaining`` as
    its deadline; on failure ``wait.failed(err)`` (raises what is not worth waiting through), then
    a pause of ``wait.pause()`` seconds; after the loop, ``raise wait.gave_up()``.
    """

    POLL_SECONDS = 0.2  # how often to ask a loading server

    def __init__(self, target: str, timeout: float) -> None:
        self._target = target
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._last: EmbeddingError | None = None

    def attempts(self) -> Iterator[float]:
        """The seconds left before the deadline, once per attempt, while some are left."""
        while (remaining := self._deadline - time.monotonic()) > 0:
            yield remaining

    def failed(self, err: grpc.RpcError) -> None:
        """Record a failed attempt; raise its :class:`EmbeddingError` unless the server is loading."""
        self._last = from_rpc_error(err)
        if not still_loading(self._last):
            raise self._last from err

    def pause(self) -> float:
        """Seconds to wait before the next attempt (never past the deadline)."""
        return min(self.POLL_SECONDS, max(0.0, self._deadline - time.monotonic()))

    def gave_up(self) -> EmbeddingError:
        """The DEADLINE_EXCEEDED error to raise when no attempt succeeded in time."""
        return not_ready_error(self._target, self._timeout, self._last)
