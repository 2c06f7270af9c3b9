"""The ASGI application: the peers' routes, their error shapes, and the guard in front of them."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from qwen25vl_embed_server.core.errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelNotReadyError,
    OutOfMemoryError,
    OverloadedError,
)
from qwen25vl_embed_server.http import cohere_routes, openai_routes
from qwen25vl_embed_server.http.errors import HTTPError, error_response, http_error
from qwen25vl_embed_server.http.guard import Guard
from qwen25vl_embed_server.http.running import Embedder
from qwen25vl_embed_server.rpc.auth import BearerTokens

# Shown per refused body: the first few problems name what to fix; the rest would only repeat.
_SHOWN_PROBLEMS = 4


def create_app(embedder: Embedder, tokens: BearerTokens | None, max_body_bytes: int) -> ASGIApp:
    """The HTTP API over ``embedder``, behind the token and body-size checks (:class:`Guard`)."""
    app = FastAPI(title="qwen25vl-embed", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.embedder = embedder
    app.include_router(openai_routes.router)
    app.include_router(cohere_routes.router)
    for error_type in (
        HTTPError,
        InvalidInputError,
        OverloadedError,
        OutOfMemoryError,
        DeadlineExceededError,
        ModelNotReadyError,
    ):
        app.add_exception_handler(error_type, _domain_error)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_exception_handler(StarletteHTTPException, _routing_error)
    app.add_exception_handler(Exception, _domain_error)  # 500 in the peer's shape; logged by the server
    return Guard(app, tokens, max_body_bytes)


async def _domain_error(request: Request, error: Exception) -> JSONResponse:
    return error_response(request.url.path, http_error(error))


async def _invalid_body(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    if "json" not in request.headers.get("content-type", ""):
        return error_response(
            request.url.path, HTTPError(400, "the body must be JSON (Content-Type: application/json)")
        )
    problems = []
    for problem in error.errors()[:_SHOWN_PROBLEMS]:
        where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"
        problems.append(f"{where}: {problem.get('msg', 'invalid')}")
    more = len(error.errors()) - _SHOWN_PROBLEMS
    message = "invalid request body: " + "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")
    return error_response(request.url.path, HTTPError(400, message))


async def _routing_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    return error_response(request.url.path, HTTPError(error.status_code, str(error.detail)))
