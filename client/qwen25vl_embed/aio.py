"""The asyncio client: :class:`EmbeddingClient`'s surface, awaitable, on ``grpc.aio``.

Its methods, their arguments and the requests they build are
:class:`~qwen25vl_embed.frontend.ClientFrontend`'s, as for the blocking client; results and
errors come from the same code (:class:`~qwen25vl_embed.assembly.ResultBuilder`,
:mod:`qwen25vl_embed.extract_many`). Only the waiting differs: this module.

Example::

    async with AsyncEmbeddingClient("localhost:50051") as client:
        result = await client.extract("cat.jpg")
        async for item in client.extract_many(paths, errors="return"):
            ...
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Coroutine, Iterable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy.typing as npt

from qwen25vl_embed.assembly import ResultBuilder
from qwen25vl_embed.channels import TLSConfig, create_aio_channel
from qwen25vl_embed.embeddings import Embeddings, retrieval_vectors
from qwen25vl_embed.errors import EmbeddingError, ReadyWait, from_rpc_error
from qwen25vl_embed.extract_many import ResultCollector, in_order, progress_bar, sized
from qwen25vl_embed.frontend import Build, ClientFrontend, StreamSettings
from qwen25vl_embed.images import ImageInput
from qwen25vl_embed.info import ServerInfo
from qwen25vl_embed.options import ExtractOptions
from qwen25vl_embed.requests import request_from_options
from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed.v1 import embed_pb2_grpc

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["AsyncEmbeddingClient"]

_T = TypeVar("_T")
_Input = ImageInput | Sequence[ImageInput]
_Results = AsyncGenerator[Embeddings | EmbeddingError, None]
_Vectors = list[npt.NDArray[Any]]


class AsyncEmbeddingClient(
    ClientFrontend[
        grpc.aio.Channel,
        Iterable[_Input] | AsyncIterable[_Input],
        Coroutine[Any, Any, Embeddings],
        _Results,
        Coroutine[Any, Any, _Vectors],
    ]
):
    """An asyncio client of one embedding server; use it as an async context manager.

    Arguments as :class:`~qwen25vl_embed.EmbeddingClient`'s, with ``channel`` a ``grpc.aio``
    channel. Create the client in the event loop that uses it (asyncio channels belong to one
    loop). Cancelling a task that awaits a call cancels the call: the server stops working on it.
    Requests are built (images read and encoded) on a worker thread, off the event loop.
    """

    _stub: embed_pb2_grpc.EmbeddingServiceAsyncStub

    async def wait_ready(self, timeout: float) -> ServerInfo:
        """Wait until the server is up and its model loaded (``info()`` answers); return its info.

        As :meth:`EmbeddingClient.wait_ready <qwen25vl_embed.EmbeddingClient.wait_ready>`.

        Raises:
            EmbeddingError: DEADLINE_EXCEEDED when the server was not ready within ``timeout``
                seconds; any other failure of the Info call at once (e.g. UNAUTHENTICATED).
        """
        wait = ReadyWait(self._target, timeout)
        for remaining in wait.attempts():
            call = self._stub.Info(pb.InfoRequest(), timeout=remaining, metadata=self._metadata, wait_for_ready=True)
            try:
                return ServerInfo.from_proto(await call)
            except grpc.RpcError as err:
                wait.failed(err)
            await asyncio.sleep(wait.pause())
        raise wait.gave_up()

    async def info(self, timeout: float | None = None) -> ServerInfo:
        """The server's model and capabilities.

        Raises:
            EmbeddingError: the call failed.
        """
        call = self._stub.Info(pb.InfoRequest(), timeout=self._deadline(timeout), metadata=self._metadata)
        try:
            return ServerInfo.from_proto(await call)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

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

    def _create_channel(
        self, target: str, tls: TLSConfig | None, token: str | None, options: Sequence[tuple[str, Any]]
    ) -> grpc.aio.Channel:
        return create_aio_channel(target, tls=tls, token=token, options=options)

    def _connect(self, channel: grpc.aio.Channel) -> None:
        self._stub = embed_pb2_grpc.EmbeddingServiceStub(channel)

    async def _extract(self, build: Build, timeout: float | None) -> Embeddings:
        request = await asyncio.to_thread(build)
        call = self._stub.Extract(request, timeout=timeout, metadata=self._metadata)
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

    async def _extract_many(
        self, images: Iterable[_Input] | AsyncIterable[_Input], options: ExtractOptions, stream: StreamSettings
    ) -> _Results:
        async def builds() -> AsyncIterator[Build]:
            async for index, image in _numbered(images):
                yield functools.partial(request_from_options, image, options, str(index))

        async for result in self._stream(builds(), sized(images), stream):
            yield result

    async def _embed(self, builds: Iterator[Build], stream: StreamSettings) -> _Vectors:
        return [retrieval_vectors(result) async for result in self._stream(_numbered_builds(builds), None, stream)]

    async def _stream(self, builds: AsyncIterator[Build], total: int | None, stream: StreamSettings) -> _Results:
        """One ExtractBatch stream over the requests ``builds`` make (built on a worker thread)."""
        if stream.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {stream.concurrency}")
        window = asyncio.Semaphore(stream.concurrency)
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

        call = self._stub.ExtractBatch(requests(), timeout=stream.timeout, metadata=self._metadata)
        bar = progress_bar(stream.progress, total)
        try:
            async for response in call:
                collector.add(response)
                for result in in_order(collector, stream.errors, bar, window.release):
                    yield result
            for result in in_order(collector, stream.errors, bar, window.release):  # e.g. trailing local failures
                yield result
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            call.cancel()  # no-op once the stream has ended
            if bar is not None:
                bar.close()


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


async def _numbered_builds(builds: Iterator[Build]) -> AsyncIterator[Build]:
    """The builders of a sync iterator, as an async one."""
    async for _, build in _numbered(builds):
        yield build
