"""The SDK's one exception type for failed calls, carrying the gRPC status code."""

from __future__ import annotations

import grpc

__all__ = ["EmbeddingError", "from_rpc_error"]


class EmbeddingError(Exception):
    """A call to the embedding service failed.

    ``code`` is the gRPC status code (``INVALID_ARGUMENT`` for a bad request, ``UNAVAILABLE``
    while the model loads or the server is unreachable, ``DEADLINE_EXCEEDED`` after a timeout,
    ``INTERNAL`` for a server fault) and ``details`` the server's message.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        # Both go to Exception.args so that the error pickles and re-raises across processes.
        super().__init__(code, details)
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


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
    )
