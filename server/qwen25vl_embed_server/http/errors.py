"""Domain errors -> HTTP statuses, and each peer's JSON error shape.

Statuses follow the gRPC <-> HTTP mapping (google.rpc.Code): InvalidInputError -> 400, over a
limit (LimitExceededError, or a body over ``max_request_bytes``) -> 413, OverloadedError and
OutOfMemoryError -> 429 with ``Retry-After``, DeadlineExceededError -> 504, ModelNotReadyError
-> 503 with ``Retry-After``, a missing or wrong token -> 401, an unknown model -> 404, anything
else -> 500 with a generic message (the traceback logged on the server).

Shapes: the OpenAI routes answer ``{"error": {"message", "type", "param", "code"}}`` (``code``:
the HTTP status, as vLLM sends it); the Cohere route (``/v2/...``) answers ``{"id", "message"}``.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse

from qwen25vl_embed_server.core.errors import (
    DeadlineExceededError,
    InvalidInputError,
    LimitExceededError,
    ModelNotReadyError,
    OutOfMemoryError,
    OverloadedError,
)

MODEL_LOADING = "the model is still loading; retry later (GET /health answers 200 once it is ready)"
INTERNAL = "internal server error; the server log has the details"

# The OpenAI error type of each status.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


@dataclass
class HTTPError(Exception):
    """A refusal with its status, a message safe for the caller, and headers (``Retry-After``)."""

    status: int
    message: str
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


def retry_after(seconds: float | None) -> dict[str, str]:
    """``Retry-After`` in whole seconds, at least 1 (HTTP has no fractions; 0 invites a storm)."""
    value = 1 if seconds is None or not math.isfinite(seconds) else max(1, math.ceil(seconds))
    return {"Retry-After": str(value)}


def http_error(error: BaseException) -> HTTPError:
    """The :class:`HTTPError` of a domain error (500, with a generic message, for anything else)."""
    if isinstance(error, HTTPError):
        return error
    if isinstance(error, LimitExceededError):
        return HTTPError(413, str(error))
    if isinstance(error, InvalidInputError):
        return HTTPError(400, str(error))
    if isinstance(error, OverloadedError):
        return HTTPError(429, str(error), retry_after(error.retry_after))
    if isinstance(error, OutOfMemoryError):
        return HTTPError(429, str(error), retry_after(None))
    if isinstance(error, DeadlineExceededError):
        return HTTPError(504, str(error))
    if isinstance(error, ModelNotReadyError):
        return HTTPError(503, MODEL_LOADING, retry_after(None))
    return HTTPError(500, INTERNAL)  # the server's error middleware logs the traceback


def openai_body(error: HTTPError) -> dict[str, object]:
    return {
        "error": {
            "message": error.message,
            "type": _TYPES.get(error.status, "invalid_request_error"),
            "param": None,
            "code": error.status,
        }
    }


def cohere_body(error: HTTPError) -> dict[str, object]:
    return {"id": str(uuid.uuid4()), "message": error.message}


def error_response(path: str, error: HTTPError) -> JSONResponse:
    """``error`` in the shape of the peer whose route ``path`` is (``/v2/``: Cohere; else OpenAI)."""
    body = cohere_body(error) if path.startswith("/v2/") else openai_body(error)
    headers = dict(error.headers)
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=error.status, headers=headers)
