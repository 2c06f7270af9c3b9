"""Domain errors of the extraction core. The service maps them to gRPC status codes."""

from __future__ import annotations


class InvalidInputError(ValueError):
    """The request cannot be served as asked: bad image, unknown output, bad dtype, ...

    The message names the problem and is safe to return to the caller.
    """


class ModelNotReadyError(RuntimeError):
    """The model is not loaded (yet, or any more)."""
