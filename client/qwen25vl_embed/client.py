"""The synchronous client: images in, :class:`~qwen25vl_embed.embeddings.Embeddings` out."""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import numpy.typing as npt

from qwen25vl_embed.assembly import ResultBuilder
from qwen25vl_embed.channels import TLSConfig, create_channel
from qwen25vl_embed.embeddings import Embeddings, retrieval_vectors
from qwen25vl_embed.errors import EmbeddingError, from_rpc_error, not_ready_error, still_loading
from qwen25vl_embed.extract_many import ErrorPolicy, ResultCollector, in_order, progress_bar, sized
from qwen25vl_embed.images import ImageInput
from qwen25vl_embed.info import ServerInfo
from qwen25vl_embed.requests import build_request, retrieval_request
from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed.v1 import embed_pb2_grpc

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["EmbeddingClient"]

_POLL_SECONDS = 0.2  # wait_ready: how often to ask a loading server


class EmbeddingClient:
    """A blocking client of one embedding server; thread-safe, use as a context manager.

    Args:
        target: the server's address, e.g. "localhost:50051".
        timeout: default deadline of every call, in seconds; None waits indefinitely.
        options: gRPC channel options for the channel created here.
        tls: TLS settings (CA, client certificate for mutual TLS); None: a plain channel.
        token: bearer token sent with every call (``authorization: Bearer <token>``). Without
            ``tls`` it crosses the network in clear text: loopback or trusted networks only.
        channel: a channel to use instead; ``target``, ``options``, ``tls`` and ``token`` must then
            be left unset, and :meth:`close` leaves the channel open for its owner to close.
        metadata: gRPC metadata sent with every call, e.g. ``[("application", "qwen25vl_embed")]``
            to pick the application behind a Ray Serve gRPC proxy that serves several.

    gRPC's default 4 MiB receive limit is enough: the server splits results into messages of at
    most its chunk size (1 MiB by default).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
        tls: TLSConfig | None = None,
        token: str | None = None,
        channel: grpc.Channel | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        if channel is not None and (tls is not None or token is not None):
            raise ValueError("tls and token configure the channel created here; not with channel=")
        self._target = target
        self._timeout = timeout
        self._metadata = tuple(metadata) or None
        self._owns_channel = channel is None
        if channel is None:
            channel = create_channel(target, tls=tls, token=token, options=options)
        self._channel = channel
        self._stub = embed_pb2_grpc.EmbeddingServiceStub(self._channel)

    def extract(
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

        Args:
            image: one image, or a list or tuple of images that form one multi-image prompt;
                None: a text request (a prompt is then required; only LM outputs exist).
            prompt: the user text after the images; None lets the server use its default
                ("Describe the image."), "" sends no text.
            prompt_format: "chat" (the chat template), "raw" (the prompt is the whole text,
                "<image>" where each image goes), "query" / "document" (the server's retrieval
                recipe; see ``ServerInfo.recipe``).
            dimensions: Matryoshka size of the retrieval outputs (0: all).
            vector_encoding: their wire form: "float" (``dtype``), "int8" or "binary".
            outputs: output names (see ``ServerInfo.outputs``); empty asks for the pooled vectors
                and visual_token_lens.
            dtype: wire dtype of floating outputs: "float32", "float16" or "bfloat16" (arrays of
                ``ml_dtypes.bfloat16``).
            normalize: L2-normalise the pooled vectors.
            request_id: echoed in the result.
            timeout: deadline in seconds for this call; None uses the client's default.
            min_pixels / max_pixels: resize range of the images (width x height), within the
                server's (``ServerInfo.min_pixels`` / ``max_pixels``); None: the server's.

        Raises:
            EmbeddingError: the call failed (e.g. INVALID_ARGUMENT for an undecodable image or an
                unknown output name, UNAVAILABLE while the model loads).
            ValueError: no image, an empty image, an unknown dtype or a pixel bound below 1, before
                anything is sent (arguments refused here raise Python's own exceptions; see
                :mod:`qwen25vl_embed.errors`).
            OSError: an image file cannot be read (FileNotFoundError for a missing one).
            TypeError: an image of an unsupported kind, or ``outputs`` given as a single string.
            qwen25vl_embed.codec.CodecError: the server's stream was malformed.
        """
        request = build_request(
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
        call = self._stub.Extract(request, timeout=self._deadline(timeout), metadata=self._metadata)
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

    def extract_many(
        self,
        images: Iterable[ImageInput | Sequence[ImageInput]],
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
    ) -> Iterator[Embeddings | EmbeddingError]:
        """Extract many requests over one ExtractBatch stream; yield results in input order.

        Each item of ``images`` is one request (an image, or a list of images forming one
        multi-image prompt); the other arguments apply to all. At most ``concurrency`` requests
        are in flight or waiting to be yielded, so memory stays bounded however long the input.
        ``images`` is consumed lazily.

        Args:
            concurrency: requests sent ahead of the results consumed.
            progress: show a progress bar (tqdm) on stderr.
            errors: "raise" raises the first failed request's :class:`EmbeddingError` when its turn
                comes; "return" yields it in place of the result and goes on. An input refused
                here (unreadable file, unsupported type) is a :class:`LocalRequestError`.
            timeout: deadline in seconds for the whole stream; None uses the client's default.
            min_pixels / max_pixels: as for :meth:`extract`.

        Raises:
            EmbeddingError: the stream failed, or a request failed and ``errors="raise"``.
        """
        builds = (
            functools.partial(
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
            for index, image in enumerate(images)
        )
        return self._stream(builds, sized(images), concurrency, progress, errors, timeout)

    def embed_queries(
        self,
        texts: Iterable[str],
        dimensions: int = 0,
        *,
        encoding: str = "float",
        concurrency: int = 16,
        timeout: float | None = None,
    ) -> list[npt.NDArray[Any]]:
        """The server's retrieval vectors for text queries, in order (the recipe's query format).

        Each is ``[T, E]`` (multi_vector: one row per token) or ``[1, E]`` (single_vector), float32,
        L2-normalised rows; ``dimensions`` truncates (Matryoshka, renormalised); ``encoding``
        "int8" / "binary" returns them in those wire forms (see the proto's VectorEncoding). Sent over one
        ExtractBatch stream, so the server batches them.

        Raises:
            EmbeddingError: a query failed (e.g. INVALID_ARGUMENT: the server has no recipe).
        """
        return self._embed(((None, text) for text in texts), "query", dimensions, encoding, concurrency, timeout)

    def embed_images(
        self,
        images: Iterable[ImageInput],
        dimensions: int = 0,
        *,
        encoding: str = "float",
        concurrency: int = 16,
        timeout: float | None = None,
    ) -> list[npt.NDArray[Any]]:
        """The server's retrieval vectors for documents (one image each, the recipe's document
        template), in order; shapes as :meth:`embed_queries`.

        Raises:
            EmbeddingError: an image failed.
        """
        items = ((image, None) for image in images)
        return self._embed(items, "document", dimensions, encoding, concurrency, timeout)

    def _embed(
        self,
        items: Iterable[tuple[ImageInput | None, str | None]],
        prompt_format: str,
        dimensions: int,
        encoding: str,
        concurrency: int,
        timeout: float | None,
    ) -> list[npt.NDArray[Any]]:
        """The retrieval vectors of (image, text) requests in ``prompt_format``, over one stream."""
        builds = (
            functools.partial(retrieval_request, image, text, index, prompt_format, dimensions, encoding)
            for index, (image, text) in enumerate(items)
        )
        return [retrieval_vectors(r) for r in self._stream(builds, None, concurrency, False, "raise", timeout)]

    def _stream(
        self,
        builds: Iterable[Callable[[], pb.ImageRequest]],
        total: int | None,
        concurrency: int,
        progress: bool,
        errors: ErrorPolicy,
        timeout: float | None,
    ) -> Iterator[Embeddings | EmbeddingError]:
        """One ExtractBatch stream over the requests ``builds`` make (built lazily, in order)."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        window = threading.Semaphore(concurrency)
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
        call = self._stub.ExtractBatch(requests(), timeout=self._deadline(timeout), metadata=self._metadata)
        bar = progress_bar(progress, total)
        try:
            # A final None drains what is left once the stream ends (e.g. trailing local failures).
            for response in itertools.chain(call, [None]):
                if response is not None:
                    collector.add(response)
                yield from in_order(collector, errors, bar, window.release)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            closed.set()
            call.cancel()  # type: ignore[no-untyped-call]  # no-op once the stream has ended
            if bar is not None:
                bar.close()

    def wait_ready(self, timeout: float) -> ServerInfo:
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
                return ServerInfo.from_proto(call)
            except grpc.RpcError as err:
                last = from_rpc_error(err)
                if not still_loading(last):
                    raise last from err
            time.sleep(min(_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        raise not_ready_error(self._target, timeout, last)

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

    def __repr__(self) -> str:
        return f"EmbeddingClient({self._target!r})"

    def _deadline(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self._timeout
