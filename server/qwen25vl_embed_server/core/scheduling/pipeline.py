"""The one request path, transport-neutral: encoded request -> checked, decoded, prompt-checked,
processed (on worker threads) -> batched on the model's lanes -> :class:`Extraction`.

The gRPC servicer and the Ray Serve replica both run requests through a :class:`Pipeline`; the
in-process CLI and the bulk job, which own their model thread, call the same
:func:`~qwen25vl_embed_server.core.admission.request.prepare_request` and then the extractor themselves.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from qwen25vl_embed_server.core.admission.budget import Budget
from qwen25vl_embed_server.core.admission.limits import Limits
from qwen25vl_embed_server.core.admission.request import (
    EncodedRequest,
    Estimate,
    check_request,
    estimate_request,
    prepare_request,
)
from qwen25vl_embed_server.core.defaults import (
    DEFAULT_MAX_PIXELS_IN_FLIGHT,
    DEFAULT_MAX_RESULT_BYTES,
    DEFAULT_MAX_TOKENS_IN_FLIGHT,
    DEFAULT_PREPROCESS_WORKERS,
)
from qwen25vl_embed_server.core.errors import LimitExceededError, OutOfMemoryError, OverloadedError
from qwen25vl_embed_server.core.scheduling.batcher import Batcher, BatchingConfig, BatchObserver, BatchTiming
from qwen25vl_embed_server.core.scheduling.model_thread import ModelThread, single_threaded_torch

if TYPE_CHECKING:
    from qwen25vl_embed_server.core.model.extractor import Extractor, Prepared
    from qwen25vl_embed_server.core.model.finishing import Extraction
    from qwen25vl_embed_server.core.model.model_info import ModelInfo
    from qwen25vl_embed_server.core.model.outputs import OutputPlan


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
        max_tokens_in_flight: server-wide budget, in tokens (:class:`~.request.Estimate`), of the
            requests between decoding and the end of their model run; new ones wait for it.
        max_pixels_in_flight: server-wide budget of decoded pixels (width x height) of the
            requests being decoded and preprocessed; new ones wait for it.
        max_result_bytes: server-wide budget of result bytes, taken before the model runs and held
            until the caller has been sent the result (or went away); new ones wait for it.
    """

    preprocess_workers: int = DEFAULT_PREPROCESS_WORKERS
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: Limits = field(default_factory=Limits)
    max_in_flight: int | None = None
    limit_hints: Mapping[str, str] = field(default_factory=dict)
    max_tokens_in_flight: int = DEFAULT_MAX_TOKENS_IN_FLIGHT
    max_pixels_in_flight: int = DEFAULT_MAX_PIXELS_IN_FLIGHT
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES

    def __post_init__(self) -> None:
        for name in ("preprocess_workers", "max_tokens_in_flight", "max_pixels_in_flight", "max_result_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

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
    """Runs requests on one model. Create, use and :meth:`close` it on one event loop.

    ``model_thread``: the thread that loaded the model, which then runs it (:mod:`~.model_thread`).
    """

    def __init__(
        self,
        extractor: Extractor,
        config: PipelineConfig = PipelineConfig(),
        batch_observer: BatchObserver | None = None,
        model_thread: ModelThread | None = None,
    ) -> None:
        self.extractor = extractor
        self.config = config
        self.batcher = Batcher(extractor, config.batching, observer=batch_observer, model_thread=model_thread)
        self._local = threading.local()
        self._preprocess = ThreadPoolExecutor(
            config.preprocess_workers, thread_name_prefix="preprocess", initializer=self._start_worker
        )
        self._in_flight = 0
        self.tokens = Budget(config.max_tokens_in_flight, "tokens in flight")
        self.pixels = Budget(config.max_pixels_in_flight, "decoded pixels in flight")
        self.result_bytes = Budget(config.max_result_bytes, "result bytes held")

    @property
    def queue_depth(self) -> int:
        return self.batcher.queue_depth

    def info(self) -> ModelInfo:
        return self.extractor.info()

    def plan(self, request: EncodedRequest) -> OutputPlan:
        """The cheap checks (no decoding): limits and output names. Raises InvalidInputError."""
        self._hinted(check_request, request, self.config.limits)
        plan: OutputPlan = self._hinted(self.extractor.plan_request, request)
        return plan

    async def run(
        self, request: EncodedRequest, deadline: float | None = None, observer: StageObserver | None = None
    ) -> Extraction:
        """:meth:`running`, the result's bytes given back as it is returned."""
        async with self.running(request, deadline, observer) as result:
            return result

    @asynccontextmanager
    async def running(
        self, request: EncodedRequest, deadline: float | None = None, observer: StageObserver | None = None
    ) -> AsyncIterator[Extraction]:
        """Check, preprocess (a worker thread), then run in a batch (a model lane); the result's
        bytes count against ``max_result_bytes`` until the block ends (send the result inside it).

        Stages and budgets: the headers give an :class:`Estimate`; its decoded pixels are held
        while decoding and preprocessing, its tokens until the model has run, the exact result
        bytes from before the model runs until the block ends. Each is waited for in order.

        Args:
            request: the request.
            deadline: ``time.monotonic()`` after which nobody waits for the result.
            observer: told of the stages' timings as they pass.

        Raises:
            InvalidInputError: a bad request (LimitExceededError: over a limit).
            OverloadedError: the server is at capacity.
            DeadlineExceededError: the deadline passed while queued or waiting for a budget.
            DeviceOutOfMemoryError: the model ran out of memory on this request.
        """
        plan = self.plan(request)  # unknown outputs and limits fail before any decoding
        if self._in_flight >= self.config.admitted:
            raise OverloadedError(f"the server is at capacity ({self._in_flight} requests in flight); retry later")
        self._in_flight += 1
        held: dict[Budget, int] = {}
        try:
            started = time.perf_counter()
            estimate = await self._in_worker(self._estimate, request, plan)
            held[self.pixels] = await self.pixels.acquire(estimate.pixels, deadline)
            held[self.tokens] = await self.tokens.acquire(estimate.tokens, deadline)
            prepared = await self.prepare(request, plan, estimated=True)
            self._give_back(held, self.pixels)  # the decoded images are gone
            held[self.result_bytes] = await self.result_bytes.acquire(self.extractor.result_bytes(prepared), deadline)
            if observer is not None:
                observer.preprocessed(time.perf_counter() - started)
            result, timing = await self.batcher.submit_timed(prepared, deadline)
            # Its pixel values (4.6 KiB a patch) are done with: not kept while a slow reader is sent
            # the result (up to --send-timeout), where no budget counts them.
            del prepared
            self._give_back(held, self.tokens)
            if observer is not None:
                observer.batched(timing)
            yield result
        finally:
            for budget in list(held):
                self._give_back(held, budget)
            self._in_flight -= 1

    @staticmethod
    def _give_back(held: dict[Budget, int], budget: Budget) -> None:
        if budget in held:
            budget.release(held.pop(budget))

    async def _in_worker(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._preprocess, function, *args)

    def _estimate(self, request: EncodedRequest, plan: OutputPlan) -> Estimate:
        estimate: Estimate = self._hinted(estimate_request, self.extractor, request, self.config.limits, plan)
        return estimate

    def _hinted(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)``, a limit refusal told how to raise the limit at this edge."""
        try:
            return function(*args, **kwargs)
        except LimitExceededError as error:
            raise error.with_hint(self.config.limit_hints) from error.__cause__

    async def prepare(
        self, request: EncodedRequest, plan: OutputPlan | None = None, estimated: bool = False
    ) -> Prepared:
        """Check, decode and preprocess ``request`` on a worker thread (each with a processor of
        its own); no admission bound, no model. ``estimated``: the header estimate was made
        already (:meth:`run` makes it to take the budgets). Raises InvalidInputError."""
        prepared: Prepared = await self._in_worker(self._prepare, request, plan or self.plan(request), estimated)
        return prepared

    async def close(self, wait: bool = True) -> None:
        """Fail what is queued, stop the model lanes and the workers (``wait`` False: without
        waiting for a model run in progress; see :meth:`Batcher.close`)."""
        await self.batcher.close(wait)
        self._preprocess.shutdown(wait=False, cancel_futures=True)

    def _start_worker(self) -> None:
        single_threaded_torch()  # the processor's torch ops must not slow the model lanes down
        # Each worker thread tokenizes with a processor of its own: fast tokenizers are not safe to
        # share between threads (huggingface/tokenizers#537).
        self._local.processor = copy.deepcopy(self.extractor.loaded.processor)

    def _prepare(self, request: EncodedRequest, plan: OutputPlan, estimated: bool) -> Prepared:
        processor: Any = self._local.processor
        try:
            prepared: Prepared = self._hinted(
                prepare_request, self.extractor, request, self.config.limits, plan, processor, estimated=estimated
            )
            return prepared
        except MemoryError as error:  # this request's decoding or processor: the others go on
            raise OutOfMemoryError(
                f"the server ran out of memory preprocessing this request ({len(request.images)} image(s)); "
                "retry with fewer or smaller images"
            ) from error
