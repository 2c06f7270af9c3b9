"""The RPCs' behaviour on protobuf messages, free of any transport's call context.

:class:`EmbeddingCalls` turns ImageRequests into the core's requests, runs them through the
:class:`~qwen25vl_embed_server.core.scheduling.pipeline.Pipeline`, observes each one, and yields the
response messages. The gRPC servicer (:mod:`.servicer`) and the Ray Serve replica
(:mod:`qwen25vl_embed_server.ray.deployment`) are thin adapters over it: each supplies the
caller's deadline and, for ExtractBatch, where to write.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed_server.core.admission.limits import MAX_REQUEST_ID_CHARS
from qwen25vl_embed_server.core.defaults import DEFAULT_CHUNK_BYTES, DEFAULT_SEND_TIMEOUT_SECONDS, DEFAULT_STREAM_WINDOW
from qwen25vl_embed_server.core.errors import InvalidInputError, ModelNotReadyError, SlowConsumerError, quoted
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.outputs import DEFAULT_OUTPUTS
from qwen25vl_embed_server.core.scheduling.model_thread import ModelThread
from qwen25vl_embed_server.core.scheduling.pipeline import Pipeline, PipelineConfig
from qwen25vl_embed_server.rpc.error_mapping import MODEL_LOADING, log_failure, status_for
from qwen25vl_embed_server.rpc.messages import (
    Response,
    Undecodable,
    error_message,
    info_response,
    response_messages,
    to_encoded,
)
from qwen25vl_embed_server.rpc.metrics import Metrics
from qwen25vl_embed_server.rpc.observation import CANCELLED, RequestObservation

Write = Callable[[Response], Awaitable[None]]


# gRPC cancels a call at its deadline by its own clock; ours (monotonic + time_remaining() at the
# start) can be a little later. A cancellation this close to the deadline is the deadline's.
DEADLINE_SLACK_SECONDS = 0.05


@dataclass(frozen=True)
class ServiceConfig:
    """``chunk_bytes``: the largest EmbeddingResponse sent. ``stream_window``: requests of one
    ExtractBatch stream in flight at once (the server reads no further ahead). ``pipeline``:
    limits, preprocessing and batching (:class:`PipelineConfig`). ``send_timeout_seconds``: a
    caller (Extract or ExtractBatch) that takes no response for this long (HTTP/2 flow control stops the
    writes once its windows are full) has its call ended (:class:`SlowConsumerError`), and the
    results held for it are freed."""

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    stream_window: int = DEFAULT_STREAM_WINDOW
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    send_timeout_seconds: float = DEFAULT_SEND_TIMEOUT_SECONDS

    def __post_init__(self) -> None:
        if not self.send_timeout_seconds > 0:
            raise ValueError(f"send_timeout_seconds must be positive, got {self.send_timeout_seconds}")
        for name in ("chunk_bytes", "stream_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def server_version() -> str:
    try:
        return version("qwen25vl-embed")
    except PackageNotFoundError:
        return "0.0.0"


class EmbeddingCalls:
    """Extract, ExtractBatch and Info, once :meth:`attach` gave them a model.

    ``metrics``: where to record (a private :class:`Metrics` when not given). ``encoded``: tensor
    messages leave as their serialized bytes (see :func:`~.messages.response_messages`); only for
    handlers that pass bytes through (:class:`~.encoded_responses.PassEncodedResponses`).
    """

    def __init__(
        self, config: ServiceConfig = ServiceConfig(), metrics: Metrics | None = None, encoded: bool = False
    ) -> None:
        self.config = config
        self.encoded = encoded
        self.metrics = metrics if metrics is not None else Metrics(process_metrics=False)
        self._pipeline: Pipeline | None = None
        self._cut_at: float | None = None

    def stopping(self, grace: float | None) -> None:
        """The server stops, giving calls ``grace`` seconds (None: 0): calls cancelled after that
        were cut by the server, which their callers receive as UNAVAILABLE."""
        self._cut_at = time.monotonic() + (grace or 0.0)

    def cancelled_status(self, deadline: float | None) -> tuple[str, str]:
        """The status (name, reason) that a caller whose call was just cancelled received."""
        now = time.monotonic()
        if self._cut_at is not None and now >= self._cut_at - DEADLINE_SLACK_SECONDS:
            return "UNAVAILABLE", "the server stopped (end of its grace period) before the request finished"
        if deadline is not None and now >= deadline - DEADLINE_SLACK_SECONDS:
            return "DEADLINE_EXCEEDED", "the caller's deadline passed"
        return CANCELLED, "the caller went away"

    def attach(self, extractor: Extractor, model_thread: ModelThread | None = None) -> None:
        """Start serving ``extractor`` (call on the event loop that serves the calls), run on
        ``model_thread``: the one that loaded it (None: a new one)."""
        pipeline = Pipeline(extractor, self.config.pipeline, batch_observer=self.metrics, model_thread=model_thread)
        self._pipeline = pipeline
        self.metrics.watch_queue(lambda: pipeline.queue_depth)
        self.metrics.watch_admission(pipeline.admission)
        self.metrics.model_loaded(extractor.loaded.load_seconds)

    async def close(self, wait: bool = True) -> None:
        """Stop the pipeline (``wait`` False: without waiting for a model run in progress)."""
        if self._pipeline is not None:
            await self._pipeline.close(wait)

    @property
    def model_running(self) -> bool:
        """True while a model run is still in progress (after :meth:`close` without waiting)."""
        return self._pipeline is not None and self._pipeline.batcher.running

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            raise ModelNotReadyError(MODEL_LOADING)
        return self._pipeline

    async def extract(self, request: pb.ImageRequest, deadline: float | None) -> AsyncGenerator[Response, None]:
        """The response messages of one request; a failure raises (the edge maps it to a status).

        ``deadline``: ``time.monotonic()`` after which the caller no longer waits (None: never).
        """
        observation = self._observe("Extract", request, request.request_id)
        try:
            # The result's bytes count against the server's budget until the last message is sent.
            async with self.pipeline.running(to_encoded(request), deadline, observation) as result:
                observation.outputs_ready(result.sequence_length)
                started = time.perf_counter()
                for message in response_messages(
                    request.request_id, result, self.config.chunk_bytes, observation.timings(), self.encoded
                ):
                    yield message
                observation.serialized(started)
        except BaseException as error:  # cancellation included: the caller went away
            observation.failed(error, self.cancelled_status(deadline))
            raise
        finally:
            observation.finish()

    async def extract_batch(
        self, requests: AsyncIterator[pb.ImageRequest | Undecodable], deadline: float | None, write: Write
    ) -> None:
        """Run a stream of requests, at most ``stream_window`` at once, writing each one's messages
        with ``write`` as it completes; a failed request gets one error message, the others go on.

        A request that is not a valid message (:class:`Undecodable`), or that reuses a request_id
        of the stream, is one such failure (INVALID_ARGUMENT); see :class:`StreamIds` for the ids.
        """
        self.pipeline  # noqa: B018 - fail the whole stream at once while the model loads
        window = asyncio.Semaphore(self.config.stream_window)
        writing = asyncio.Lock()
        tasks: set[asyncio.Task[None]] = set()
        ids = StreamIds()

        async def one(request: pb.ImageRequest | Undecodable, request_id: str, refusal: str | None) -> None:
            observation = self._observe("ExtractBatch", request, request_id)
            try:
                if isinstance(request, Undecodable):
                    raise request.error(f"request {request_id} of the stream")
                if refusal is not None:
                    raise InvalidInputError(refusal)
                async with self.pipeline.running(to_encoded(request, request_id), deadline, observation) as result:
                    observation.outputs_ready(result.sequence_length)
                    async with writing:
                        started = time.perf_counter()
                        for message in response_messages(
                            request_id, result, self.config.chunk_bytes, observation.timings(), self.encoded
                        ):
                            await self.send(write, message)
                        observation.serialized(started)
            except asyncio.CancelledError as error:
                observation.failed(error, self.cancelled_status(deadline))
                raise
            except SlowConsumerError as error:  # the whole call ends: no error message can go out
                observation.failed(error)
                raise
            except Exception as error:
                observation.failed(error)
                code, details = status_for(error)
                log_failure("ExtractBatch", request_id, error)
                async with writing:
                    await self.send(write, error_message(request_id, code.value[0], details))
            finally:
                window.release()
                observation.finish()

        try:
            index = 0
            async for request in requests:
                await window.acquire()  # flow control: stop reading while the window is full
                explicit = "" if isinstance(request, Undecodable) else request.request_id
                task = asyncio.create_task(one(request, *ids.assign(explicit, index)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                index += 1
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            # Let them end (and give their budgets back) before the call does.
            await asyncio.gather(*tasks, return_exceptions=True)

    async def send(self, write: Write, message: Response) -> None:
        """``write(message)``, or :class:`SlowConsumerError` when the caller takes it for longer
        than the send timeout (HTTP/2 flow control holds the write while it reads nothing)."""
        timeout = self.config.send_timeout_seconds
        try:
            await asyncio.wait_for(write(message), timeout)
        except TimeoutError:
            raise SlowConsumerError(
                f"the caller read no response for {timeout:g} s; the call is ended and its results dropped"
            ) from None

    def info(self) -> pb.InfoResponse:
        return info_response(self.pipeline.info(), self.config.chunk_bytes, server_version())

    def _observe(self, method: str, request: pb.ImageRequest | Undecodable, request_id: str) -> RequestObservation:
        if isinstance(request, Undecodable):
            return RequestObservation.begin(method, request_id, 0, (), self.metrics)
        outputs = list(request.outputs) or list(DEFAULT_OUTPUTS)
        return RequestObservation.begin(method, request_id, len(request.images), outputs, self.metrics)


class StreamIds:
    """The request ids of one ExtractBatch stream: each id answers one request only.

    An empty id becomes the request's 0-based index in decimal, or, if the stream already used that
    id, ``<index>.<n>`` with the smallest n >= 1 not used. An explicit id already used (explicitly,
    or given to an earlier request in place of an empty one) is refused. Ids over the length limit
    are not remembered: the request is refused for its length anyway.
    """

    def __init__(self) -> None:
        self._used: dict[str, int] = {}

    def assign(self, explicit: str, index: int) -> tuple[str, str | None]:
        """The id that the request at ``index`` is answered under, and why it is refused (None: it
        is not)."""
        if explicit:
            earlier = self._used.get(explicit)
            if earlier is not None:
                return explicit, (
                    f"request_id {quoted(explicit)} is already used by request {earlier} of this stream; "
                    "request ids must be unique within a stream"
                )
            if len(explicit) <= MAX_REQUEST_ID_CHARS:
                self._used[explicit] = index
            return explicit, None
        candidate, n = str(index), 0
        while candidate in self._used:
            n += 1
            candidate = f"{index}.{n}"
        self._used[candidate] = index
        return candidate, None
