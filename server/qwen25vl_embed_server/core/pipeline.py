"""The one request path, transport-neutral: encoded request -> checked, decoded, prompt-checked,
processed (on worker threads) -> batched on the model thread -> :class:`Extraction`.

The gRPC servicer and the Ray Serve replica both run requests through a :class:`Pipeline`; the
in-process CLI and the bulk job, which own their model thread, call the same
:func:`~qwen25vl_embed_server.core.request.prepare_request` and then the extractor themselves.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from qwen25vl_embed_server.core.batcher import Batcher, BatchingConfig, BatchObserver, BatchTiming
from qwen25vl_embed_server.core.defaults import DEFAULT_PREPROCESS_WORKERS
from qwen25vl_embed_server.core.errors import LimitExceededError, OverloadedError
from qwen25vl_embed_server.core.limits import Limits
from qwen25vl_embed_server.core.request import EncodedRequest, check_request, prepare_request

if TYPE_CHECKING:
    from qwen25vl_embed_server.core.extractor import Extraction, Extractor, Prepared
    from qwen25vl_embed_server.core.model_info import ModelInfo
    from qwen25vl_embed_server.core.outputs import OutputPlan


@dataclass(frozen=True)
class PipelineConfig:
    """How requests are admitted, preprocessed and batched.

    Attributes:
        preprocess_workers: threads decoding images and running the processor.
        batching: the batcher's bounds.
        limits: per-request limits.
        max_in_flight: requests admitted at once, from validation to result; beyond,
            :class:`OverloadedError` before any decoding (None: the queue, plus the preprocessing
            threads, plus one full batch).
        limit_hints: how an operator sets each limit at this edge (``{"max_images":
            "--max-images"}``), appended to the refusal's message.
    """

    preprocess_workers: int = DEFAULT_PREPROCESS_WORKERS
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: Limits = field(default_factory=Limits)
    max_in_flight: int | None = None
    limit_hints: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preprocess_workers < 1:
            raise ValueError(f"preprocess_workers must be at least 1, got {self.preprocess_workers}")

    @property
    def admitted(self) -> int:
        """The bound on requests in flight (see ``max_in_flight``)."""
        batching = self.batching
        return self.max_in_flight or batching.max_queue + self.preprocess_workers + batching.max_images


class StageObserver(Protocol):
    """Hears where one request's time went (e.g. its request-log line)."""

    def preprocessed(self, seconds: float) -> None: ...

    def batched(self, timing: BatchTiming) -> None: ...


class Pipeline:
    """Runs requests on one model. Create, use and :meth:`close` it on one event loop."""

    def __init__(
        self,
        extractor: Extractor,
        config: PipelineConfig = PipelineConfig(),
        batch_observer: BatchObserver | None = None,
    ) -> None:
        self.extractor = extractor
        self.config = config
        self.batcher = Batcher(extractor, config.batching, observer=batch_observer)
        self._local = threading.local()
        self._preprocess = ThreadPoolExecutor(
            config.preprocess_workers, thread_name_prefix="preprocess", initializer=self._start_worker
        )
        self._in_flight = 0

    @property
    def queue_depth(self) -> int:
        return self.batcher.queue_depth

    def info(self) -> ModelInfo:
        return self.extractor.info()

    def plan(self, request: EncodedRequest) -> OutputPlan:
        """The cheap checks (no decoding): limits and output names. Raises InvalidInputError."""
        try:
            check_request(request, self.config.limits)
            return self.extractor.plan_request(request)
        except LimitExceededError as error:
            raise error.with_hint(self.config.limit_hints) from error.__cause__

    async def run(
        self, request: EncodedRequest, deadline: float | None = None, observer: StageObserver | None = None
    ) -> Extraction:
        """Check, preprocess (a worker thread), then run in a batch (the model thread).

        Args:
            request: the request.
            deadline: ``time.monotonic()`` after which nobody waits for the result.
            observer: told of the stages' timings as they pass.

        Raises:
            InvalidInputError: a bad request (LimitExceededError: over a limit).
            OverloadedError: the server is at capacity.
            DeadlineExceededError: the deadline passed while queued.
            DeviceOutOfMemoryError: the model ran out of memory on this request.
        """
        plan = self.plan(request)  # unknown outputs and limits fail before any decoding
        if self._in_flight >= self.config.admitted:
            raise OverloadedError(f"the server is at capacity ({self._in_flight} requests in flight); retry later")
        self._in_flight += 1
        try:
            started = time.perf_counter()
            prepared = await self.prepare(request, plan)
            if observer is not None:
                observer.preprocessed(time.perf_counter() - started)
            result, timing = await self.batcher.submit_timed(prepared, deadline)
            if observer is not None:
                observer.batched(timing)
            return result
        finally:
            self._in_flight -= 1

    async def prepare(self, request: EncodedRequest, plan: OutputPlan | None = None) -> Prepared:
        """Check, decode and preprocess ``request`` on a worker thread (each with a processor of
        its own); no admission bound, no model. Raises InvalidInputError."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._preprocess, self._prepare, request, plan or self.plan(request))

    async def close(self) -> None:
        """Fail what is queued, stop the model thread and the workers."""
        await self.batcher.close()
        self._preprocess.shutdown(wait=False, cancel_futures=True)

    def _start_worker(self) -> None:
        # Each worker thread tokenizes with a processor of its own: fast tokenizers are not safe to
        # share between threads (huggingface/tokenizers#537).
        self._local.processor = copy.deepcopy(self.extractor.loaded.processor)

    def _prepare(self, request: EncodedRequest, plan: OutputPlan) -> Prepared:
        processor: Any = self._local.processor
        try:
            return prepare_request(self.extractor, request, self.config.limits, plan, processor)
        except LimitExceededError as error:
            raise error.with_hint(self.config.limit_hints) from error.__cause__
