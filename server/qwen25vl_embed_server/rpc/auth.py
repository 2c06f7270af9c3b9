"""Bearer-token authentication: a server interceptor that checks ``authorization: Bearer <token>``.

Every method needs a valid token except the standard health checks (``/grpc.health.v1.Health/*``),
which load balancers and orchestrators call without credentials. Reflection needs a token: it
describes the service to whoever asks.

Tokens come from a file (one per line; blank lines and ``#`` comments skipped) or an environment
variable (one token, or several separated by commas), never from the command line, where other
users of the machine can read them. Several tokens allow rotation: add the new one, move the
clients, remove the retired one. Comparison is constant-time (``hmac.compare_digest`` over SHA-256
digests, against every token).

Tokens travel in clear text unless the server uses TLS (:mod:`.tls`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from qwen25vl_embed_server.core.errors import quoted

log = logging.getLogger(__name__)

OPEN_METHOD_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/",)
"""Methods reachable without a token."""

_SCHEME = "bearer"


@dataclass(frozen=True)
class AuthConfig:
    """The accepted bearer tokens (at least one). ``repr`` never shows them."""

    tokens: tuple[str, ...] = field(repr=False)

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("authentication needs at least one token")
        for number, token in enumerate(self.tokens, 1):
            _validate_token(token, f"token {number}")

    @classmethod
    def from_sources(cls, token_file: str | os.PathLike[str] | None = None, token_env: str | None = None) -> AuthConfig:
        """The tokens of ``token_file`` and of the environment variable ``token_env``, together.

        Raises:
            ValueError: neither source given, the variable unset or empty, no token found, or a
                token with whitespace or non-ASCII characters.
            OSError: the file cannot be read.
        """
        return cls(tuple(load_tokens(token_file, token_env)))


def load_tokens(token_file: str | os.PathLike[str] | None = None, token_env: str | None = None) -> list[str]:
    """Read tokens from a file (one per line, ``#`` comments) and/or an environment variable.

    Raises:
        ValueError: neither source given, the variable unset or empty, or no token found.
        OSError: the file cannot be read.
    """
    if token_file is None and token_env is None:
        raise ValueError("give a token file or an environment variable holding the token(s)")
    tokens: list[str] = []
    if token_file is not None:
        path = Path(token_file)
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("token file %s is readable by other users; chmod 600 it", path)
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.append(line)
    if token_env is not None:
        value = os.environ.get(token_env, "")
        if not value.strip():
            raise ValueError(f"environment variable {token_env} is unset or empty")
        tokens.extend(part.strip() for part in value.split(",") if part.strip())
    if not tokens:
        raise ValueError(f"no token found in {token_file}")
    for number, token in enumerate(tokens, 1):
        _validate_token(token, f"token {number}")
    return tokens


def _validate_token(token: str, what: str) -> None:
    # gRPC metadata values must be printable ASCII; a space would split "Bearer <token>".
    if not token or not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError(f"{what} must be non-empty printable ASCII without whitespace")


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses calls without a valid ``authorization: Bearer <token>`` with UNAUTHENTICATED.

    Put it first in the server's interceptors, so a refused call never reaches the others or the
    servicer (its request is not even read: :func:`_refusing_handler`). Methods under
    ``open_prefixes`` skip the check.
    """

    def __init__(self, tokens: Iterable[str], open_prefixes: Iterable[str] = OPEN_METHOD_PREFIXES) -> None:
        self._tokens = BearerTokens(tokens)
        self._open_prefixes = tuple(open_prefixes)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method
        if method.startswith(self._open_prefixes):
            return await continuation(handler_call_details)
        problem = self._problem(handler_call_details.invocation_metadata)
        if problem is None:
            return await continuation(handler_call_details)
        log.info("%s -> UNAUTHENTICATED: %s", quoted(method), problem)  # the path is the client's
        handler = await continuation(handler_call_details)
        return _refusing_handler(handler, problem)

    def _problem(self, metadata: Any) -> str | None:
        """None if the metadata carries a valid token, else what is wrong (safe to tell the caller)."""
        return self._tokens.problem([value for key, value in (metadata or ()) if key == "authorization"])


class BearerTokens:
    """The accepted tokens (kept as SHA-256 digests) and the check of a call's credentials, for
    every edge: the gRPC interceptor checks metadata with it, the HTTP API its headers."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._digests = tuple(_digest(token) for token in tokens)
        if not self._digests:
            raise ValueError("authentication needs at least one token")

    def problem(self, values: Sequence[str | bytes], where: str = "metadata") -> str | None:
        """None if ``values`` (every ``authorization`` entry of the call, in its ``where``:
        metadata or header) hold exactly one valid ``Bearer <token>``, else what is wrong (safe to
        tell the caller)."""
        if not values:
            return f"missing credentials: send the {where} 'authorization: Bearer <token>'"
        if len(values) > 1:
            return f"several authorization {where} entries; send exactly one"
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != _SCHEME or not token.strip():
            return f"malformed authorization {where}: expected 'Bearer <token>'"
        given = _digest(token.strip())
        matched = False
        for digest in self._digests:  # no early exit: the time does not depend on which token matched
            matched |= hmac.compare_digest(given, digest)
        return None if matched else "invalid bearer token"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def _refusing_handler(handler: grpc.RpcMethodHandler[Any, Any] | None, message: str) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler that aborts with UNAUTHENTICATED before a byte of the request is read.

    Always a request-streaming one, whatever the method: for a unary request gRPC receives the
    whole message (up to --max-request-bytes, 64 MiB) before it calls the handler, so each refused
    call held its body (20 such calls: +1.7 GB). A streaming handler is called on the metadata
    alone; it aborts without reading, and the server resets the stream: only what HTTP/2 flow
    control let in is ever buffered (measured: 6 refused calls of 40 MiB grew the peak RSS by 13
    to 18 MiB, tests/rpc/test_unauthenticated_bodies.py). The wire format of one request message
    is the same either way, so any client sees the same status.
    """

    async def refuse(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    serializer = handler.response_serializer if handler is not None else None
    if handler is not None and (handler.unary_stream is not None or handler.stream_stream is not None):
        return grpc.stream_stream_rpc_method_handler(refuse, response_serializer=serializer)
    return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=serializer)
