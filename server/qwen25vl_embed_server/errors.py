"""Domain errors of the extraction core. The service maps them to gRPC status codes."""

from __future__ import annotations


class InvalidInputError(ValueError):
    """The request cannot be served as asked: bad image, unknown output, bad dtype, ...

    The message names the problem and is safe to return to the caller.
    """


class ModelNotReadyError(RuntimeError):
    """The model is not loaded (yet, or any more)."""


class OverloadedError(RuntimeError):
    """The request queue is full (or the server is stopping): retry later."""


class DeadlineExceededError(RuntimeError):
    """The caller's deadline passed before the model ran the request."""


class DeviceOutOfMemoryError(RuntimeError):
    """The device ran out of memory on this request; memory was released, the server goes on."""
