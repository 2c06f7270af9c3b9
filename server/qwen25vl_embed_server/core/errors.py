"""Domain errors of the extraction core. Each edge maps them to its own codes (gRPC status codes
in :mod:`qwen25vl_embed_server.rpc.error_mapping`; exit codes and messages in the CLI)."""

from __future__ import annotations

from collections.abc import Mapping

CLIENT_TEXT_CHARS = 64
"""The most characters of a client's string that a message or log line quotes."""


def quoted(text: str, limit: int = CLIENT_TEXT_CHARS) -> str:
    """``text`` from a client, safe to put in a message or a log line: Python-quoted (control
    characters, newlines and quotes escaped) and cut to ``limit`` characters, saying how long it was."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class InvalidInputError(ValueError):
    """The request cannot be served as asked: bad image, unknown output, bad dtype, ...

    The message names the problem and is safe to return to the caller.
    """


class LimitExceededError(InvalidInputError):
    """The request is over one of the :class:`~qwen25vl_embed_server.core.admission.limits.Limits`.

    ``limit`` is the field name (``max_images``, ...); the message names it and its value. An edge
    that lets an operator set the limit adds how (:meth:`with_hint`: a flag, a settings key).
    """

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit

    def with_hint(self, hints: Mapping[str, str]) -> LimitExceededError:
        """This error with `` (set with HINT)`` appended, if ``hints`` knows the limit."""
        hint = hints.get(self.limit)
        if hint is None:
            return self
        hinted = LimitExceededError(self.limit, f"{self} (set with {hint})")
        hinted.__cause__ = self.__cause__
        return hinted


class ModelNotReadyError(RuntimeError):
    """The model is not loaded (yet, or any more)."""


class OverloadedError(RuntimeError):
    """The server refuses new work now: retry later, here or elsewhere.

    Attributes:
        reason: why, as the refusal metrics name it: ``"queue"`` (the queue or the requests in
            flight are at their bound, or the server is stopping), ``"deadline"`` (the work ahead
            would not let this request finish within its deadline), ``"memory"`` (the memory
            budgets cannot hold it soon enough).
        retry_after: seconds after which a retry is expected to be admitted, when the server can
            tell (each edge sends it: gRPC's ``grpc-retry-pushback-ms``, HTTP's ``Retry-After``).
    """

    def __init__(self, message: str, *, reason: str = "queue", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


class DeadlineExceededError(RuntimeError):
    """The caller's deadline passed before the model ran the request."""


class SlowConsumerError(RuntimeError):
    """The caller took no result for the send timeout: its call is ended, its results dropped."""


class OutOfMemoryError(RuntimeError):
    """Memory ran out on this request (host RAM or the device); the server goes on."""


class DeviceOutOfMemoryError(OutOfMemoryError):
    """The model's run of this request ran out of memory (the device's, or host RAM on the CPU);
    memory was released, the server goes on."""


class ModelLoadError(RuntimeError):
    """The model could not be loaded (a bad id or path, a hub that cannot be reached, a device
    that is not there, weights that do not all fit the model). The message is one line naming the
    model and the cause."""
