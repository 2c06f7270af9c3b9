"""The synchronous client: images in, :class:`~qwen25vl_embed.embeddings.Embeddings` out.

Its methods and their arguments are :class:`~qwen25vl_embed.frontend.ClientFrontend`'s; this
module is the blocking transport under them (``grpc`` calls, a thread-fed request stream).
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import numpy.typing as npt

from qwen25vl_embed.assembly import ResultBuilder
from qwen25vl_embed.channels import TLSConfig, create_channel
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

__all__ = ["EmbeddingClient"]

_Results = Iterator[Embeddings | EmbeddingError]


class EmbeddingClient(
    ClientFrontend[
        grpc.Channel,
        Iterable[ImageInput | Sequence[ImageInput]],
        Embeddings,
        _Results,
        list[npt.NDArray[Any]],
    ]
):
    """A blocking client of one embedding server; thread-safe, use as a context manager.

    Arguments as :class:`~qwen25vl_embed.frontend.ClientFrontend`'s (target, timeout, options,
    tls, token, channel, metadata); ``channel`` is a ``grpc.Channel``.

    gRPC's default 4 MiB receive limit is enough: the server splits results into messages of at
    most its chunk size (1 MiB by default).
    """

    _stub: embed_pb2_grpc.EmbeddingServiceStub

    def wait_ready(self, timeout: float) -> ServerInfo:
        """Wait until the server is up and its model loaded (``info()`` answers); return its info.

        Waits through a server not listening yet and one still loading (UNAVAILABLE), polling a
        few times a second.

        Raises:
            EmbeddingError: DEADLINE_EXCEEDED when the server was not ready within ``timeout``
                seconds; any other failure of the Info call at once (e.g. UNAUTHENTICATED).
        """
        wait = ReadyWait(self._target, timeout)
        for remaining in wait.attempts():
            try:
                return ServerInfo.from_proto(
                    self._stub.Info(pb.InfoRequest(), timeout=remaining, metadata=self._metadata, wait_for_ready=True)
                )
            except grpc.RpcError as err:
                wait.failed(err)
            time.sleep(wait.pause())
        raise wait.gave_up()

    def info(self, timeout: float | None = None) -> ServerInfo:
        """The server's model and capabilities.

        Raises:
            EmbeddingError: the call failed.
        """
        try:
            response = self._stub.Info(pb.InfoRequest(), timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return ServerInfo.from_proto(response)

    def close(self) -> None:
        """Close the channel, if this client created it. Calls in progress are cancelled."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _create_channel(
        self, target: str, tls: TLSConfig | None, token: str | None, options: Sequence[tuple[str, Any]]
    ) -> grpc.Channel:
        return create_channel(target, tls=tls, token=token, options=options)

    def _connect(self, channel: grpc.Channel) -> None:
        self._stub = embed_pb2_grpc.EmbeddingServiceStub(channel)

    def _extract(self, build: Build, timeout: float | None) -> Embeddings:
        call = self._stub.Extract(build(), timeout=timeout, metadata=self._metadata)
        builder = ResultBuilder()
        try:
            for response in call:
                builder.add(response)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        except BaseException:
            # Stop the server's work when the client gives up on a malformed stream.
            call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves cancel() unannotated
            raise
        return builder.build()

    def _extract_many(
        self, images: Iterable[ImageInput | Sequence[ImageInput]], options: ExtractOptions, stream: StreamSettings
    ) -> _Results:
        builds = (
            functools.partial(request_from_options, image, options, str(index)) for index, image in enumerate(images)
        )
        return self._stream(builds, sized(images), stream)

    def _embed(self, builds: Iterator[Build], stream: StreamSettings) -> list[npt.NDArray[Any]]:
        return [retrieval_vectors(result) for result in self._stream(builds, None, stream)]

    def _stream(self, builds: Iterable[Build], total: int | None, stream: StreamSettings) -> _Results:
        """One ExtractBatch stream over the requests ``builds`` make (built lazily, in order, on
        gRPC's request-sending thread)."""
        if stream.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {stream.concurrency}")
        window = threading.Semaphore(stream.concurrency)
        closed = threading.Event()

        def requests() -> Iterator[pb.ImageRequest]:
            for index, build in enumerate(builds):
                request = collector.build(index, build)
                if request is None:  # reported in its place; never sent, holds no window slot
                    continue
                while not window.acquire(timeout=0.1):
                    if closed.is_set():
                        return
                if closed.is_set():
                    return
                yield request

        collector = ResultCollector()
        call = self._stub.ExtractBatch(requests(), timeout=stream.timeout, metadata=self._metadata)
        bar = progress_bar(stream.progress, total)
        try:
            # A final None drains what is left once the stream ends (e.g. trailing local failures).
            for response in itertools.chain(call, [None]):
                if response is not None:
                    collector.add(response)
                yield from in_order(collector, stream.errors, bar, window.release)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            closed.set()
            call.cancel()  # type: ignore[no-untyped-call]  # no-op once the stream has ended
            if bar is not None:
                bar.close()
