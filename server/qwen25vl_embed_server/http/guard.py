"""What every HTTP request passes before a route sees it: the bearer token (from the headers,
before a byte of the body is read) and the body's size (``max_request_bytes``, as gRPC's receive
limit), both refused in the route's peer's error shape.

An ASGI middleware of its own (not a FastAPI dependency): a dependency runs after FastAPI has read
and parsed the body, which a refused caller should never cost.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwen25vl_embed_server.core.errors import quoted
from qwen25vl_embed_server.http.errors import HTTPError, error_response
from qwen25vl_embed_server.rpc.auth import BearerTokens

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health"})
"""Reachable without a token: load balancers and orchestrators probe it without credentials."""


class Guard:
    """Refuses a request without a valid ``Authorization: Bearer <token>`` (401; none needed
    when ``tokens`` is None), or whose body is over ``max_body_bytes`` (413)."""

    def __init__(self, app: ASGIApp, tokens: BearerTokens | None, max_body_bytes: int) -> None:
        self.app = app
        self.tokens = tokens
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if self.tokens is not None and path not in OPEN_PATHS:
            values = [value for key, value in headers if key == b"authorization"]
            problem = self.tokens.problem(values, "header")
            if problem is not None:
                log.info("%s -> 401: %s", quoted(path), problem)
                await error_response(path, HTTPError(401, problem))(scope, receive, send)
                return
        declared = next((value for key, value in headers if key == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(path, int(declared), scope, receive, send)
            return
        body = bytearray()
        while True:  # read it here, bounded: a chunked body declares no length
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await self._too_large(path, len(body), scope, receive, send, "at least ")
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _too_large(
        self, path: str, size: int, scope: Scope, receive: Receive, send: Send, qualifier: str = ""
    ) -> None:
        error = HTTPError(
            413,
            f"the request body is {qualifier}{size} bytes; the limit is max_request_bytes={self.max_body_bytes} "
            "(set with --max-request-bytes)",
        )
        response = error_response(path, error)
        response.headers["Connection"] = "close"  # the rest of the body is never read
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the body already read, then waits on the connection as before."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            message: dict[str, Any] = {"type": "http.request", "body": body, "more_body": False}
            return message
        return await receive()

    return replayed
