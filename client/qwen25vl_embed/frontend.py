"""What both clients are, written once: their constructor and request methods.

:class:`ClientFrontend` turns each method's arguments into one
:class:`~qwen25vl_embed.ExtractOptions` and the requests' builders
(:func:`~qwen25vl_embed.requests.request_from_options`), then hands them to the transport of its
subclass: :class:`~qwen25vl_embed.EmbeddingClient` blocks on ``grpc``,
:class:`~qwen25vl_embed.AsyncEmbeddingClient` awaits ``grpc.aio``. The type parameters say what a
method returns on each: a value, or an awaitable of it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from qwen25vl_embed.channels import TLSConfig
from qwen25vl_embed.choices import PromptFormat, VectorEncoding
from qwen25vl_embed.extract_many import ErrorPolicy
from qwen25vl_embed.images import ImageInput
from qwen25vl_embed.options import ExtractOptions, merge
from qwen25vl_embed.requests import request_from_options
from qwen25vl_embed.retries import DEFAULT_RETRY, RetryPolicy, retry_options
from qwen25vl_embed.v1 import embed_pb2 as pb

__all__ = ["Build", "ClientFrontend", "StreamSettings"]

Build = Callable[[], pb.ImageRequest]
"""Builds one request when called (on the transport's schedule: lazily, maybe on a worker thread)."""

_Channel = TypeVar("_Channel")
_Inputs = TypeVar("_Inputs")  # what extract_many reads its inputs from
_One = TypeVar("_One")  # extract's result: Embeddings, or an awaitable of it
_Many = TypeVar("_Many")  # extract_many's: an iterator of results, or an async one
_Vectors = TypeVar("_Vectors")  # embed_*'s: a list of arrays, or an awaitable of it


@dataclasses.dataclass(frozen=True)
class StreamSettings:
    """How one ExtractBatch stream runs: its window, progress bar, error policy and deadline."""

    concurrency: int
    progress: bool
    errors: ErrorPolicy
    timeout: float | None


class ClientFrontend(Generic[_Channel, _Inputs, _One, _Many, _Vectors]):
    """The methods of a client of one embedding server, over a transport its subclass provides.

    Args:
        target: the server's address, e.g. "localhost:50051".
        timeout: default deadline of every call, in seconds; None waits indefinitely.
        options: gRPC channel options for the channel created here.
        tls: TLS settings (CA, client certificate for mutual TLS); None: a plain channel.
        token: bearer token sent with every call (``authorization: Bearer <token>``). Without
            ``tls`` it crosses the network in clear text: loopback or trusted networks only.
        channel: a channel to use instead; ``options``, ``tls`` and ``token`` must then be left
            unset, and ``close()`` leaves the channel open for its owner to close.
        metadata: gRPC metadata sent with every call, e.g. ``[("application", "qwen25vl_embed")]``
            to pick the application behind a Ray Serve gRPC proxy that serves several.
        retry: how gRPC retries a refused call (:class:`~qwen25vl_embed.RetryPolicy`; by default
            UNAVAILABLE and RESOURCE_EXHAUSTED, 4 attempts, exponential backoff, the server's
            pushback honoured); None: never. Not with ``channel=`` (its own options decide).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
        tls: TLSConfig | None = None,
        token: str | None = None,
        channel: _Channel | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        retry: RetryPolicy | None = DEFAULT_RETRY,
    ) -> None:
        if channel is not None and (tls is not None or token is not None or retry is not DEFAULT_RETRY):
            raise ValueError("tls, token and retry configure the channel created here; not with channel=")
        self._target = target
        self._timeout = timeout
        self._metadata = tuple(metadata) or None
        self._owns_channel = channel is None
        if channel is None:
            # The client's policy goes into the options; create_channel's default then finds it there.
            channel = self._create_channel(target, tls, token, retry_options(options, retry))
        self._channel = channel
        self._connect(channel)

    def extract(
        self,
        image: ImageInput | Sequence[ImageInput] | None,
        prompt: str | None = None,
        outputs: Sequence[str] | None = None,
        dtype: str | None = None,
        normalize: bool | None = None,
        request_id: str = "",
        timeout: float | None = None,
        *,
        options: ExtractOptions | None = None,
        prompt_format: PromptFormat | str | None = None,
        dimensions: int | None = None,
        vector_encoding: VectorEncoding | str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        adapter: str | None = None,
        task: str | None = None,
    ) -> _One:
        """Run the model on one request and return its outputs (awaitable on the asyncio client).

        Args:
            image: one image, or a list or tuple of images that form one multi-image prompt;
                None: a text request (a prompt is then required; only LM outputs exist).
            request_id: echoed in the result.
            options: the request's settings (:class:`~qwen25vl_embed.ExtractOptions`: prompt,
                outputs, dtype, normalize, prompt_format, dimensions, vector_encoding, min_pixels,
                max_pixels, timeout, adapter, task); each other argument given (not None) overrides its
                field.
                Without ``options``: the fields' defaults ("float32", the chat format, the pooled
                vectors and visual_token_lens, the client's timeout, ...).

        Raises:
            EmbeddingError: the call failed (e.g. INVALID_ARGUMENT for an undecodable image or an
                unknown output name, UNAVAILABLE while the model loads).
            ValueError: no image, an empty image, an unknown dtype, prompt format or vector
                encoding, or a pixel bound below 1, before anything is sent (arguments refused here
                raise Python's own exceptions; see :mod:`qwen25vl_embed.errors`).
            OSError: an image file cannot be read (FileNotFoundError for a missing one).
            TypeError: an image of an unsupported kind, or ``outputs`` given as a single string.
            qwen25vl_embed.codec.CodecError: the server's stream was malformed.
            asyncio.CancelledError: (asyncio) the awaiting task was cancelled; the call is too.
        """
        chosen = merge(
            options,
            prompt=prompt,
            outputs=outputs,
            dtype=dtype,
            normalize=normalize,
            timeout=timeout,
            prompt_format=prompt_format,
            dimensions=dimensions,
            vector_encoding=vector_encoding,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            adapter=adapter,
            task=task,
        )
        build = functools.partial(request_from_options, image, chosen, request_id)
        return self._extract(build, self._deadline(chosen.timeout))

    def extract_many(
        self,
        images: _Inputs,
        prompt: str | None = None,
        outputs: Sequence[str] | None = None,
        dtype: str | None = None,
        normalize: bool | None = None,
        *,
        options: ExtractOptions | None = None,
        concurrency: int = 16,
        progress: bool = False,
        errors: ErrorPolicy = "raise",
        timeout: float | None = None,
        prompt_format: PromptFormat | str | None = None,
        dimensions: int | None = None,
        vector_encoding: VectorEncoding | str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        adapter: str | None = None,
        task: str | None = None,
    ) -> _Many:
        """Extract many requests over one ExtractBatch stream; yield results in input order.

        Each item of ``images`` is one request (an image, or a list of images forming one
        multi-image prompt); the settings apply to all (as for :meth:`extract`; ``timeout`` is the
        whole stream's). At most ``concurrency`` requests are in flight or waiting to be yielded,
        so memory stays bounded however long the input. ``images`` is consumed lazily; the asyncio
        client also takes an async iterable, read on the event loop, and its stream is cancelled
        once the generator is closed (close it promptly with ``contextlib.aclosing``).

        Args:
            concurrency: requests sent ahead of the results consumed.
            progress: show a progress bar (tqdm) on stderr.
            errors: "raise" raises the first failed request's :class:`EmbeddingError` when its turn
                comes; "return" yields it in place of the result and goes on. An input refused
                here (unreadable file, unsupported type, a bad setting) is a
                :class:`LocalRequestError`.

        Raises:
            EmbeddingError: the stream failed, or a request failed and ``errors="raise"``.
        """
        chosen = merge(
            options,
            prompt=prompt,
            outputs=outputs,
            dtype=dtype,
            normalize=normalize,
            timeout=timeout,
            prompt_format=prompt_format,
            dimensions=dimensions,
            vector_encoding=vector_encoding,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            adapter=adapter,
            task=task,
        )
        stream = StreamSettings(concurrency, progress, errors, self._deadline(chosen.timeout))
        return self._extract_many(images, chosen, stream)

    def embed_queries(
        self,
        texts: Iterable[str],
        dimensions: int | None = None,
        *,
        encoding: VectorEncoding | str | None = None,
        options: ExtractOptions | None = None,
        concurrency: int = 16,
        timeout: float | None = None,
        adapter: str | None = None,
        task: str | None = None,
    ) -> _Vectors:
        """The server's retrieval vectors for text queries, in order (the recipe's query format).

        Each is ``[T, E]`` (multi_vector: one row per token) or ``[1, E]`` (single_vector), float32,
        L2-normalised rows; ``dimensions`` truncates (Matryoshka, renormalised); ``encoding`` (the
        vector encoding) "int8" / "binary" returns them in those wire forms (see the proto's
        VectorEncoding). Sent over one ExtractBatch stream, so the server batches them. ``options``
        as for :meth:`extract`, but for its prompt and prompt format: the query's. ``adapter``:
        the retrieval adapter whose vectors these are (``ServerInfo.adapters``; None: ``options``').
        ``task``: the recipe's task (``ServerInfo.recipe.tasks``; None: ``options``', "" its default).

        Raises:
            EmbeddingError: a query failed (e.g. INVALID_ARGUMENT: the server has no recipe).
        """
        chosen = merge(
            options, dimensions=dimensions, vector_encoding=encoding, timeout=timeout, adapter=adapter, task=task
        )
        return self._retrieval(((None, text) for text in texts), PromptFormat.QUERY, chosen, concurrency)

    def embed_images(
        self,
        images: Iterable[ImageInput],
        dimensions: int | None = None,
        *,
        encoding: VectorEncoding | str | None = None,
        options: ExtractOptions | None = None,
        concurrency: int = 16,
        timeout: float | None = None,
        adapter: str | None = None,
        task: str | None = None,
    ) -> _Vectors:
        """The server's retrieval vectors for documents (one image each, the recipe's document
        template), in order; shapes and settings as :meth:`embed_queries`.

        Raises:
            EmbeddingError: an image failed.
        """
        chosen = merge(
            options, dimensions=dimensions, vector_encoding=encoding, timeout=timeout, adapter=adapter, task=task
        )
        return self._retrieval(((image, None) for image in images), PromptFormat.DOCUMENT, chosen, concurrency)

    def embed_passages(
        self,
        texts: Iterable[str],
        dimensions: int | None = None,
        *,
        encoding: VectorEncoding | str | None = None,
        options: ExtractOptions | None = None,
        concurrency: int = 16,
        timeout: float | None = None,
        adapter: str | None = None,
        task: str | None = None,
    ) -> _Vectors:
        """The server's retrieval vectors for text documents (passages), in order: the recipe's
        document format with a text (jina-v4: "Passage: " + text; its text-matching task: "Query: "
        + text); shapes and settings (``adapter``, ``task``) as :meth:`embed_queries`.

        Raises:
            EmbeddingError: a text failed (INVALID_ARGUMENT: the recipe has no text documents).
        """
        chosen = merge(
            options, dimensions=dimensions, vector_encoding=encoding, timeout=timeout, adapter=adapter, task=task
        )
        return self._retrieval(((None, text) for text in texts), PromptFormat.DOCUMENT, chosen, concurrency)

    def _retrieval(
        self,
        items: Iterable[tuple[ImageInput | None, str | None]],
        prompt_format: PromptFormat,
        options: ExtractOptions,
        concurrency: int,
    ) -> _Vectors:
        """The retrieval vectors of (image, text) requests in ``prompt_format``, over one stream."""
        builds = (
            functools.partial(
                request_from_options,
                image,
                dataclasses.replace(options, prompt=text, prompt_format=prompt_format),
                str(index),
            )
            for index, (image, text) in enumerate(items)
        )
        return self._embed(builds, StreamSettings(concurrency, False, "raise", self._deadline(options.timeout)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._target!r})"

    def _deadline(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self._timeout

    # The transport: what a subclass provides.

    def _create_channel(
        self, target: str, tls: TLSConfig | None, token: str | None, options: Sequence[tuple[str, Any]]
    ) -> _Channel:
        raise NotImplementedError

    def _connect(self, channel: _Channel) -> None:
        """Make the stub of ``channel``."""
        raise NotImplementedError

    def _extract(self, build: Build, timeout: float | None) -> _One:
        """One Extract call of the request ``build`` makes, assembled."""
        raise NotImplementedError

    def _extract_many(self, images: _Inputs, options: ExtractOptions, stream: StreamSettings) -> _Many:
        """One ExtractBatch stream of a request per item of ``images`` (request id: its index)."""
        raise NotImplementedError

    def _embed(self, builds: Iterator[Build], stream: StreamSettings) -> _Vectors:
        """The retrieval vectors of the requests ``builds`` make, over one stream."""
        raise NotImplementedError
