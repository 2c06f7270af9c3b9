"""The asyncio client: :class:`EmbeddingClient`'s surface, awaitable, on ``grpc.aio``.

Requests, results and errors are built by the same code as the blocking client's
(:func:`~qwen25vl_embed.requests.build_request`, :class:`~qwen25vl_embed.assembly.ResultBuilder`,
:mod:`qwen25vl_embed.extract_many`); only the waiting differs.

Example::

    async with AsyncEmbeddingClient("localhost:50051") as client:
        result = await client.extract("cat.jpg")
        async for item in client.extract_many(paths, errors="return"):
            ...
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy.typing as npt

from qwen25vl_embed.assembly import ResultBuilder
from qwen25vl_embed.channels import TLSConfig, create_aio_channel
from qwen25vl_embed.embeddings import Embeddings, retrieval_vectors
from qwen25vl_embed.errors import EmbeddingError, from_rpc_error, not_ready_error, still_loading
from qwen25vl_embed.extract_many import ErrorPolicy, ResultCollector, in_order, progress_bar, sized
from qwen25vl_embed.images import ImageInput
from qwen25vl_embed.info import ServerInfo
from qwen25vl_embed.requests import build_request
from qwen25vl_embed.requests import retrieval_request as _retrieval_request
from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed.v1 import embed_pb2_grpc

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["AsyncEmbeddingClient"]

_POLL_SECONDS = 0.2  # wait_ready: how often to ask a loading server

_T = TypeVar("_T")


class AsyncEmbeddingClient:
    """An asyncio client of one embedding server; use it as an async context manager.

    Arguments as :class:`~qwen25vl_embed.EmbeddingClient`'s, with ``channel`` a ``grpc.aio``
    channel. Create the client in the event loop that uses it (asyncio channels belong to one
    loop). Cancelling a task that awaits a call cancels the call: the server stops working on it.

    Args:
        target: the server's address, e.g. "localhost:50051".
        timeout: default deadline of every call, in seconds; None waits indefinitely.
        options: gRPC channel options for the channel created here.
        tls: TLS settings (CA, client certificate for mutual TLS); None: a plain channel.
        token: bearer token sent with every call (``authorization: Bearer <token>``). Without
            ``tls`` it crosses the network in clear text: loopback or trusted networks only.
        channel: a ``grpc.aio`` channel to use instead; ``options``, ``tls`` and ``token`` must
            then be left unset, and :meth:`close` leaves the channel open for its owner to close.
        metadata: gRPC metadata sent with every call.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
        tls: TLSConfig | None = None,
        token: str | None = None,
        channel: grpc.aio.Channel | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        if channel is not None and (tls is not None or token is not None):
            raise ValueError("tls and token configure the channel created here; not with channel=")
        self._target = target
        self._timeout = timeout
        self._metadata = tuple(metadata) or None
        self._owns_channel = channel is None
        if channel is None:
            channel = create_aio_channel(target, tls=tls, token=token, options=options)
        self._channel = channel
        self._stub = embed_pb2_grpc.EmbeddingServiceStub(channel)

    async def extract(
        self,
        image: ImageInput | Sequence[ImageInput] | None,
        prompt: str | None = None,
        outputs: Sequence[str] = (),
        dtype: str = "float32",
        normalize: bool = False,
        request_id: str = "",
        timeout: float | None = None,
        *,
        prompt_format: str = "chat",
        dimensions: int = 0,
        vector_encoding: str = "float",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> Embeddings:
        """Run the model on one request and return its outputs.

        Arguments, result and errors as :meth:`EmbeddingClient.extract
        <qwen25vl_embed.EmbeddingClient.extract>`. Images are read and encoded on a worker thread,
        off the event loop.

        Raises:
            EmbeddingError: the call failed.
            ValueError, TypeError, OSError: a bad argument or unreadable file, before anything is sent.
            qwen25vl_embed.codec.CodecError: the server's stream was malformed.
            asyncio.CancelledError: the awaiting task was cancelled (the call is cancelled too).
        """
        build = functools.partial(
            build_request,
            image,
            prompt,
            outputs,
            dtype,
            normalize,
            request_id,
            prompt_format,
            dimensions,
            vector_encoding,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )
        request = await asyncio.to_thread(build)
        call = self._stub.Extract(request, timeout=self._deadline(timeout), metadata=self._metadata)
        builder = ResultBuilder()
        try:
            async for response in call:
                builder.add(response)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        except BaseException:
            call.cancel()  # cancelled, or a malformed stream: stop the server's work
            raise
        return builder.build()

    async def extract_many(
        self,
        images: Iterable[ImageInput | Sequence[ImageInput]] | AsyncIterable[ImageInput | Sequence[ImageInput]],
        prompt: str | None = None,
        outputs: Sequence[str] = (),
        dtype: str = "float32",
        normalize: bool = False,
        *,
        concurrency: int = 16,
        progress: bool = False,
        errors: ErrorPolicy = "raise",
        timeout: float | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> AsyncGenerator[Embeddings | EmbeddingError, None]:
        """Extract many requests over one ExtractBatch stream; yield results in input order.

        As :meth:`EmbeddingClient.extract_many <qwen25vl_embed.EmbeddingClient.extract_many>`
        (same window and error policy), and ``images`` may also be an async iterable. It is
        consumed lazily, on the event loop: a blocking iterator blocks the loop while it runs.
        Leaving the loop early cancels the stream once the generator is closed; close it
        promptly with ``contextlib.aclosing``.

        Raises:
            EmbeddingError: the stream failed, or a request failed and ``errors="raise"``.
        """

        async def builds() -> AsyncIterator[Callable[[], pb.ImageRequest]]:
            async for index, image in _numbered(images):
                yield functools.partial(
                    build_request,
                    image,
                    prompt,
                    outputs,
                    dtype,
                    normalize,
                    str(index),
                    min_pixels=min_pixels,
                    max_pixels=max_pixels,
                )

        async for result in self._stream(builds(), sized(images), concurrency, progress, errors, timeout):
            yield result

    async def embed_queries(
        self,
        texts: Iterable[str],
        dimensions: int = 0,
        *,
        encoding: str = "float",
        concurrency: int = 16,
        timeout: float | None = None,
    ) -> list[npt.NDArray[Any]]:
        """As :meth:`EmbeddingClient.embed_queries <qwen25vl_embed.EmbeddingClient.embed_queries>`."""

        items = ((None, text) for text in texts)
        return await self._embed(items, "query", dimensions, encoding, concurrency, timeout)

    async def embed_images(
        self,
        images: Iterable[ImageInput],
        dimensions: int = 0,
        *,
        encoding: str = "float",
        concurrency: int = 16,
        timeout: float | None = None,
    ) -> list[npt.NDArray[Any]]:
        """As :meth:`EmbeddingClient.embed_images <qwen25vl_embed.EmbeddingClient.embed_images>`."""

        items = ((image, None) for image in images)
        return await self._embed(items, "document", dimensions, encoding, concurrency, timeout)

    async def _embed(
        self,
        items: Iterable[tuple[ImageInput | None, str | None]],
        prompt_format: str,
        dimensions: int,
        encoding: str,
        concurrency: int,
        timeout: float | None,
    ) -> list[npt.NDArray[Any]]:
        """The retrieval vectors of (image, text) requests in ``prompt_format``, over one stream."""

        async def builds() -> AsyncIterator[Callable[[], pb.ImageRequest]]:
            for index, (image, text) in enumerate(items):
                yield functools.partial(_retrieval_request, image, text, index, prompt_format, dimensions, encoding)

        return [retrieval_vectors(r) async for r in self._stream(builds(), None, concurrency, False, "raise", timeout)]

    async def _stream(
        self,
        builds: AsyncIterator[Callable[[], pb.ImageRequest]],
        total: int | None,
        concurrency: int,
        progress: bool,
        errors: ErrorPolicy,
        timeout: float | None,
    ) -> AsyncGenerator[Embeddings | EmbeddingError, None]:
        """One ExtractBatch stream over the requests ``builds`` make (built on a worker thread)."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        window = asyncio.Semaphore(concurrency)
        collector = ResultCollector()

        async def requests() -> AsyncIterator[pb.ImageRequest]:
            index = 0
            async for build in builds:
                request = await asyncio.to_thread(collector.build, index, build)
                index += 1
                if request is None:  # reported in its place; never sent, holds no window slot
                    continue
                await window.acquire()
                yield request

        call = self._stub.ExtractBatch(requests(), timeout=self._deadline(timeout), metadata=self._metadata)
        bar = progress_bar(progress, total)
        try:
            async for response in call:
                collector.add(response)
                for result in in_order(collector, errors, bar, window.release):
                    yield result
            for result in in_order(collector, errors, bar, window.release):  # e.g. trailing local failures
                yield result
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            call.cancel()  # no-op once the stream has ended
            if bar is not None:
                bar.close()

    async def wait_ready(self, timeout: float) -> ServerInfo:
        """Wait until the server is up and its model loaded (``info()`` answers); return its info.

        Waits through a server not listening yet and one still loading (UNAVAILABLE), polling a
        few times a second.

        Raises:
            EmbeddingError: DEADLINE_EXCEEDED when the server was not ready within ``timeout``
                seconds; any other failure of the Info call at once (e.g. UNAUTHENTICATED).
        """
        deadline = time.monotonic() + timeout
        last: EmbeddingError | None = None
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                call = self._stub.Info(
                    pb.InfoRequest(), timeout=remaining, metadata=self._metadata, wait_for_ready=True
                )
                return ServerInfo.from_proto(await call)
            except grpc.RpcError as err:
                last = from_rpc_error(err)
                if not still_loading(last):
                    raise last from err
            await asyncio.sleep(min(_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        raise not_ready_error(self._target, timeout, last)

    async def info(self, timeout: float | None = None) -> ServerInfo:
        """The server's model and capabilities.

        Raises:
            EmbeddingError: the call failed.
        """
        try:
            response = await self._stub.Info(pb.InfoRequest(), timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return ServerInfo.from_proto(response)

    async def close(self) -> None:
        """Close the channel, if this client created it. Calls in progress are cancelled."""
        if self._owns_channel:
            await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncEmbeddingClient({self._target!r})"

    def _deadline(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self._timeout


async def _numbered(items: Iterable[_T] | AsyncIterable[_T]) -> AsyncIterator[tuple[int, _T]]:
    """(index, item) of a sync or async iterable."""
    if isinstance(items, AsyncIterable):
        index = 0
        async for item in items:
            yield index, item
            index += 1
    else:
        for index, item in enumerate(items):
            yield index, item
