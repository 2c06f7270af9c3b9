"""The gRPC servicer: protobuf in, the extraction pipeline, protobuf out.

Pipeline per request: cheap validation on the event loop; image decoding and the processor on a
pool of preprocessing threads; the model in the batcher's batches on the one device thread;
response messages built as they are sent.

Every request is observed (:mod:`.observe`): its stage timings go to the caller in
``ResponseMetadata.timings``, to the metrics, and to one line of the request log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import grpc

from qwen25vl_embed import codec
from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed.v1 import embed_pb2_grpc as pb_grpc

from . import observe
from .batcher import Batcher, BatchingConfig
from .decoding import decode_image
from .errors import InvalidInputError, ModelNotReadyError, OverloadedError
from .extractor import Extraction, Extractor, Prepared
from .limits import Limits, check_prompt_tokens, check_request
from .metrics import Metrics
from .observe import RequestObservation
from .outputs import DEFAULT_OUTPUTS, OutputPlan
from .preprocess import DEFAULT_PROMPT
from .status import log_failure, status_for

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_REQUEST_ID_CHARS = 256


def server_version() -> str:
    try:
        return version("qwen25vl-embed")
    except PackageNotFoundError:
        return "0.0.0"


@dataclass(frozen=True)
class ServiceConfig:
    """``chunk_bytes``: the largest EmbeddingResponse sent. ``stream_window``: requests of one
    ExtractBatch stream in flight at once (the server reads no further ahead). ``max_in_flight``:
    requests admitted at once, from validation to result; beyond, RESOURCE_EXHAUSTED before any
    decoding (None: the queue, plus the preprocessing threads, plus one full batch)."""

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    preprocess_workers: int = 4
    stream_window: int = 64
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: Limits = field(default_factory=Limits)
    max_in_flight: int | None = None


class EmbeddingService(pb_grpc.EmbeddingServiceServicer):
    """Serves Extract, ExtractBatch and Info once :meth:`attach` gave it a model.

    ``metrics``: where to record (a private :class:`Metrics` when not given).
    """

    def __init__(self, config: ServiceConfig = ServiceConfig(), metrics: Metrics | None = None) -> None:
        self._config = config
        self.metrics = metrics if metrics is not None else Metrics(process_metrics=False)
        self._batcher: Batcher | None = None
        self._preprocess = ThreadPoolExecutor(config.preprocess_workers, thread_name_prefix="preprocess")
        # Requests anywhere between admission and result (preprocessing, queued, running). Bounded so
        # that request bodies waiting for a preprocessing thread cannot pile up without limit.
        self._in_flight = 0
        batching = config.batching
        self._max_in_flight = config.max_in_flight or (
            batching.max_queue + config.preprocess_workers + batching.max_images
        )

    def attach(self, extractor: Extractor) -> None:
        """Start serving ``extractor`` (call on the server's event loop)."""
        batcher = Batcher(extractor, self._config.batching, observer=self.metrics)
        self._batcher = batcher
        self.metrics.watch_queue(lambda: batcher.queue_depth)
        self.metrics.model_loaded(extractor.loaded.load_seconds)

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()
        self._preprocess.shutdown(wait=False, cancel_futures=True)

    @property
    def batcher(self) -> Batcher:
        if self._batcher is None:
            raise ModelNotReadyError("the model is still loading; retry later")
        return self._batcher

    async def Extract(  # noqa: N802 - the RPC's name
        self, request: pb.ImageRequest, context: grpc.aio.ServicerContext[pb.ImageRequest, pb.EmbeddingResponse]
    ) -> AsyncIterator[pb.EmbeddingResponse]:
        observation = self._observe("Extract", request, request.request_id)
        try:
            result = await self._extract(request, _deadline(context))
            observation.outputs_ready(result.sequence_length)
            started = time.perf_counter()
            for message in self._messages(request.request_id, result, _timings(observation)):
                yield message
            observation.serialized(started)
        except BaseException as error:  # cancellation included: the caller went away
            observation.failed(error)
            raise
        finally:
            observation.finish()

    # A coroutine that writes with context.write (grpc.aio allows it; the stubs expect an iterator).
    async def ExtractBatch(  # type: ignore[override]  # noqa: N802 - the RPC's name
        self,
        request_iterator: AsyncIterator[pb.ImageRequest],
        context: grpc.aio.ServicerContext[pb.ImageRequest, pb.EmbeddingResponse],
    ) -> None:
        self.batcher  # noqa: B018 - fail the whole stream at once while the model loads
        window = asyncio.Semaphore(self._config.stream_window)
        writing = asyncio.Lock()
        tasks: set[asyncio.Task[None]] = set()

        async def one(request: pb.ImageRequest, request_id: str) -> None:
            observation = self._observe("ExtractBatch", request, request_id)
            try:
                result = await self._extract(request, _deadline(context))
                observation.outputs_ready(result.sequence_length)
                async with writing:
                    started = time.perf_counter()
                    for message in self._messages(request_id, result, _timings(observation)):
                        await context.write(message)
                    observation.serialized(started)
            except asyncio.CancelledError as error:
                observation.failed(error)
                raise
            except Exception as error:
                observation.failed(error)
                code, details = status_for(error)
                log_failure("ExtractBatch", request_id, error)
                async with writing:
                    await context.write(
                        pb.EmbeddingResponse(
                            request_id=request_id, error=pb.RequestError(code=code.value[0], message=details), last=True
                        )
                    )
            finally:
                window.release()
                observation.finish()

        try:
            index = 0
            async for request in request_iterator:
                await window.acquire()  # flow control: stop reading while the window is full
                task = asyncio.create_task(one(request, request.request_id or str(index)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                index += 1
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def Info(  # noqa: N802 - the RPC's name
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext[pb.InfoRequest, pb.InfoResponse]
    ) -> pb.InfoResponse:
        extractor = self.batcher.extractor
        loaded = extractor.loaded
        vision = loaded.model.config.vision_config
        size = loaded.processor.image_processor.size
        return pb.InfoResponse(
            model=loaded.name,
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
            vision_hidden_size=int(vision.hidden_size),
            hidden_size=int(loaded.model.config.text_config.hidden_size),
            patch_size=int(vision.patch_size),
            spatial_merge_size=int(vision.spatial_merge_size),
            temporal_patch_size=int(vision.temporal_patch_size),
            min_pixels=int(size["shortest_edge"]),
            max_pixels=int(size["longest_edge"]),
            outputs=list(extractor.outputs),
            default_outputs=list(DEFAULT_OUTPUTS),
            num_lm_layers=extractor.num_lm_layers,
            num_vision_layers=extractor.num_vision_layers,
            chunk_bytes=self._config.chunk_bytes,
            server_version=server_version(),
        )

    async def _extract(self, request: pb.ImageRequest, deadline: float | None) -> Extraction:
        """Validate, preprocess (worker threads), then run in a batch (device thread)."""
        batcher = self.batcher
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidInputError(
                f"request_id is {len(request.request_id)} characters; the limit is {MAX_REQUEST_ID_CHARS}"
            )
        check_request(request, self._config.limits)
        dtype = _wire_dtype(request.dtype)
        plan = batcher.extractor.plan(list(request.outputs))  # unknown outputs fail before any decoding
        if self._in_flight >= self._max_in_flight:
            raise OverloadedError(f"the server is at capacity ({self._in_flight} requests in flight); retry later")
        self._in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            observation = observe.current()
            started = time.perf_counter()
            prepared = await loop.run_in_executor(
                self._preprocess, _prepare, batcher.extractor, request, plan, dtype, self._config.limits
            )
            if observation is not None:
                observation.preprocessed(started)
            result, timing = await batcher.submit_timed(prepared, deadline)
            if observation is not None:
                observation.batched(timing)
            return result
        finally:
            self._in_flight -= 1

    def _observe(self, method: str, request: pb.ImageRequest, request_id: str) -> RequestObservation:
        outputs = list(request.outputs) or list(DEFAULT_OUTPUTS)
        return RequestObservation.begin(method, request_id, len(request.images), outputs, self.metrics)

    def _messages(
        self, request_id: str, result: Extraction, timings: pb.Timings | None = None
    ) -> Iterator[pb.EmbeddingResponse]:
        """Metadata (with ``timings``, if given) first, then the tensors in messages of at most
        ``chunk_bytes``; the final one has ``last`` set."""
        message = pb.EmbeddingResponse(
            request_id=request_id,
            metadata=pb.ResponseMetadata(
                visual_token_lens=result.visual_token_lens.tolist(),
                image_grid_thw=[pb.ImageGrid(t=t, h=h, w=w) for t, h, w in result.image_grid_thw.tolist()],
                image_token_positions=result.image_token_positions.tolist(),
                sequence_length=result.sequence_length,
                timings=timings,
            ),
        )
        for parts in codec.pack(result.tensors, self._config.chunk_bytes):
            yield message
            message = pb.EmbeddingResponse(request_id=request_id, tensors=parts)
        message.last = True
        yield message


def _prepare(extractor: Extractor, request: pb.ImageRequest, plan: OutputPlan, dtype: str, limits: Limits) -> Prepared:
    """Decode and preprocess one request (runs on a preprocessing thread)."""
    images = [decode_image(image.data, index, limits.max_pixels) for index, image in enumerate(request.images)]
    prompt = request.prompt if request.HasField("prompt") else DEFAULT_PROMPT
    check_prompt_tokens(extractor.loaded.processor.tokenizer, prompt, limits)
    return extractor.prepare(images, prompt, plan, dtype, request.normalize)


def _timings(observation: RequestObservation) -> pb.Timings:
    """The observation's timings so far, for ResponseMetadata (milliseconds)."""
    return pb.Timings(
        queue_ms=(observation.queue or 0.0) * 1000,
        preprocess_ms=(observation.preprocess or 0.0) * 1000,
        model_ms=(observation.model or 0.0) * 1000,
        total_ms=(observation.ready or 0.0) * 1000,
        batch_size=observation.batch_size,
    )


def _deadline(context: grpc.aio.ServicerContext[pb.ImageRequest, pb.EmbeddingResponse]) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _wire_dtype(dtype: int) -> str:
    if dtype == pb.DTYPE_UNSPECIFIED:
        return "float32"
    if dtype in (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16):
        return codec.dtype_name(dtype)
    name = pb.DType.Name(dtype) if dtype in pb.DType.values() else str(dtype)  # type: ignore[arg-type]
    raise InvalidInputError(f"dtype {name} is not a floating-point wire dtype; use FLOAT32, FLOAT16 or BFLOAT16")
