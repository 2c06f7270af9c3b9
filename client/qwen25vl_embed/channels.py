"""Channels to an embedding server: plain, TLS, mutual TLS, with or without a bearer token.

A token over TLS travels as call credentials (gRPC's ``access_token_call_credentials``). gRPC
refuses call credentials on a plain channel, so there a client interceptor adds the same
``authorization: Bearer <token>`` metadata instead: the token then crosses the network in clear
text, which is only acceptable on loopback or a network you trust. Use TLS anywhere else.

:func:`create_channel` makes a blocking channel, :func:`create_aio_channel` an asyncio one, from
the same arguments and with the same rules. Both carry the service's retry policy
(:class:`~qwen25vl_embed.retries.RetryPolicy`, gRPC's own retries) unless told otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeAlias

import grpc

from qwen25vl_embed.retries import DEFAULT_RETRY, RetryPolicy, StreamRelease, retry_options

__all__ = ["PEMSource", "TLSConfig", "create_aio_channel", "create_channel"]

PEMSource: TypeAlias = bytes | str | os.PathLike[str]
"""PEM data as ``bytes``, or the path of a PEM file as ``str`` or ``os.PathLike``."""


@dataclass(frozen=True)
class TLSConfig:
    """TLS settings of a client.

    Attributes:
        ca_cert: CA certificate(s) that sign the server's certificate; None uses the system's
            root certificates.
        client_cert: this client's certificate chain, for servers that require mutual TLS.
        client_key: the private key of ``client_cert`` (``repr`` never shows it).

    Each is PEM ``bytes`` or the path of a PEM file (``str`` or ``os.PathLike``).
    """

    ca_cert: PEMSource | None = None
    client_cert: PEMSource | None = None
    client_key: PEMSource | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together: give both or neither")

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials for these settings.

        Raises:
            OSError: a file cannot be read.
        """
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.ca_cert),
            private_key=_read_pem(self.client_key),
            certificate_chain=_read_pem(self.client_cert),
        )


def create_channel(
    target: str,
    *,
    tls: TLSConfig | None = None,
    token: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
    retry: RetryPolicy | None = DEFAULT_RETRY,
) -> grpc.Channel:
    """A channel to ``target`` ("host:port"): TLS when ``tls`` is given, plain otherwise.

    Args:
        target: the server's address.
        tls: TLS settings; None: a plain (unencrypted) channel.
        token: bearer token sent as ``authorization: Bearer <token>`` on every call. Without
            ``tls`` it is sent in clear text: loopback or trusted networks only.
        options: gRPC channel options.
        retry: how gRPC retries the service's refused calls; None: never (see
            :func:`~qwen25vl_embed.retries.retry_options` for how it meets ``options``).

    Raises:
        ValueError: an empty token, or one with whitespace or non-ASCII characters; a
            ``grpc.service_config`` option that is not a JSON object.
        OSError: a PEM file cannot be read.
    """
    if token is not None:
        _validate_token(token)
    options = retry_options(options, retry)
    interceptors: list[Any] = [] if retry is None else [StreamRelease()]
    if tls is not None:
        credentials = tls.credentials()
        if token is not None:
            credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
        channel = grpc.secure_channel(target, credentials, options=list(options))
    else:
        channel = grpc.insecure_channel(target, options=list(options))
        if token is not None:
            interceptors.append(_BearerTokenInterceptor(token))
    return grpc.intercept_channel(channel, *interceptors) if interceptors else channel


def create_aio_channel(
    target: str,
    *,
    tls: TLSConfig | None = None,
    token: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
    retry: RetryPolicy | None = DEFAULT_RETRY,
) -> grpc.aio.Channel:
    """An asyncio channel (``grpc.aio``) to ``target``; arguments and errors as :func:`create_channel`.

    Create it while an event loop runs (or in the loop that will use it): asyncio channels belong
    to one loop.
    """
    if token is not None:
        _validate_token(token)
    options = retry_options(options, retry)
    if tls is not None:
        credentials = tls.credentials()
        if token is not None:
            credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
        return grpc.aio.secure_channel(target, credentials, options=list(options))
    # grpc-stubs types aio client interceptors as a placeholder that every value must be cast to.
    interceptors: Any = None if token is None else _aio_token_interceptors(token)
    return grpc.aio.insecure_channel(target, options=list(options), interceptors=interceptors)


def _read_pem(source: PEMSource | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


def _validate_token(token: str) -> None:
    # Metadata values must be printable ASCII; a newline would let a token inject metadata.
    if not token or not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError("token must be non-empty printable ASCII without whitespace")


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _BearerTokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds ``authorization: Bearer <token>`` to every call of a plain channel."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [item for item in (details.metadata or ()) if item[0] != "authorization"]
        metadata.append(self._header)
        return _CallDetails(  # type: ignore[return-value]  # grpc-stubs: ClientCallDetails is abstract
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self, continuation: Callable[[grpc.ClientCallDetails, Any], Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(
        self, continuation: Callable[[grpc.ClientCallDetails, Any], Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Iterator[Any]], Any],
        details: grpc.ClientCallDetails,
        request_iterator: Iterator[Any],
    ) -> Any:
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Iterator[Any]], Any],
        details: grpc.ClientCallDetails,
        request_iterator: Iterator[Any],
    ) -> Any:
        return continuation(self._with_token(details), request_iterator)


class _AioTokenMetadata:
    """Adds ``authorization: Bearer <token>`` to the details of a call on a plain asyncio channel.

    grpc.aio files each interceptor under the first interceptor type it is an instance of, so
    each call type has its own class below.
    """

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*[item for item in (details.metadata or ()) if item[0] != "authorization"])
        metadata.add(*self._header)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _AioUnaryUnaryToken(_AioTokenMetadata, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._with_token(details), request)


class _AioUnaryStreamToken(_AioTokenMetadata, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._with_token(details), request)


class _AioStreamUnaryToken(_AioTokenMetadata, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await continuation(self._with_token(details), request_iterator)


class _AioStreamStreamToken(_AioTokenMetadata, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await continuation(self._with_token(details), request_iterator)


def _aio_token_interceptors(token: str) -> list[_AioTokenMetadata]:
    kinds = (_AioUnaryUnaryToken, _AioUnaryStreamToken, _AioStreamUnaryToken, _AioStreamStreamToken)
    return [kind(token) for kind in kinds]
