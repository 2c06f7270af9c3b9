"""The one request path, transport-neutral: encoded request -> checked, decoded, prompt-checked,
processed (on worker threads) -> batched on the model's lanes -> :class:`Extraction`.

The gRPC servicer and the Ray Serve replica both run requests through a :class:`Pipeline`; the
in-process CLI and the bulk job, which own their model thread, call the same
:func:`~qwen25vl_embed_server.core.admission.request.prepare_request` and then the extractor themselves.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from qwen25vl_embed_server.core.admission import allocator
from qwen25vl_embed_server.core.admission.budget import Budget
from qwen25vl_embed_server.core.admission.calibration import calibrate
from qwen25vl_embed_server.core.admission.limits import Limits
from qwen25vl_embed_server.core.admission.memory import (
    PROCESSOR_BYTES_PER_TOKEN,
    MemoryBudgets,
    activation_bytes_per_token,
    baseline_bytes,
    resident_bytes,
    weight_bytes,
)
from qwen25vl_embed_server.core.admission.overload import Admission, Admitted
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

log = logging.getLogger(__name__)


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
        memory_limit: bytes the whole process may hold (:mod:`~.admission.memory`): the budgets
            left None derive from it once the model is loaded, and a request more than they let one
            request hold is refused (:class:`OverloadedError`, reason ``memory``). None: the
            budgets left None take their fixed defaults, and request bytes are not bounded.
        max_request_bytes_in_flight: server-wide bytes of request messages (encoded images and
            prompt) admitted and not finished; beyond, :class:`OverloadedError` (reason ``memory``).
        trim_after_bytes: after a request whose decoded pixels (3 bytes each) and tokens (9 KiB
            each) came to this many bytes, freed memory is given back to the system
            (:func:`~.admission.allocator.trim`, on a worker thread); None: never.
        calibration_seconds: before serving, :meth:`Pipeline.calibrate` measures a few sizes within
            about this many seconds (:mod:`~.admission.calibration`); 0: none.

    Each budget left None: derived from ``memory_limit``, else the default in :mod:`~.defaults`.
    """

    preprocess_workers: int = DEFAULT_PREPROCESS_WORKERS
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: Limits = field(default_factory=Limits)
    max_in_flight: int | None = None
    limit_hints: Mapping[str, str] = field(default_factory=dict)
    max_tokens_in_flight: int | None = None
    max_pixels_in_flight: int | None = None
    max_result_bytes: int | None = None
    memory_limit: int | None = None
    max_request_bytes_in_flight: int | None = None
    trim_after_bytes: int | None = None
    calibration_seconds: float = 0.0

    def __post_init__(self) -> None:
        if not self.calibration_seconds >= 0:
            raise ValueError(f"calibration_seconds must be at least 0, got {self.calibration_seconds}")
        for name in ("preprocess_workers", *_BUDGETS, "memory_limit", "max_request_bytes_in_flight"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")

    def budgets(self, memory: MemoryBudgets | None) -> tuple[int, int, int, int | None]:
        """Tokens, pixels, result bytes and request bytes in flight: each as given, else from
        ``memory`` (the limit's), else its default (request bytes: unbounded)."""
        return (
            self.max_tokens_in_flight or (memory.tokens if memory else DEFAULT_MAX_TOKENS_IN_FLIGHT),
            self.max_pixels_in_flight or (memory.pixels if memory else DEFAULT_MAX_PIXELS_IN_FLIGHT),
            self.max_result_bytes or (memory.result_bytes if memory else DEFAULT_MAX_RESULT_BYTES),
            self.max_request_bytes_in_flight or (memory.request_bytes if memory else None),
        )

    @property
    def admitted(self) -> int:
        """The bound on requests in flight (see ``max_in_flight``)."""
        batching = self.batching
        return self.max_in_flight or batching.max_queue + self.preprocess_workers + batching.max_images


_BUDGETS = ("max_tokens_in_flight", "max_pixels_in_flight", "max_result_bytes")


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
        self._estimating = ThreadPoolExecutor(2, thread_name_prefix="estimate")
        self._in_flight = 0
        self.memory = self._memory_budgets()
        tokens, pixels, result_bytes, request_bytes = config.budgets(self.memory)
        self.tokens = Budget(tokens, "tokens in flight")
        self.pixels = Budget(pixels, "decoded pixels in flight")
        self.result_bytes = Budget(result_bytes, "result bytes held")
        self.admission = Admission(config.batching.max_piece_tokens, request_bytes)
        self._trimming = False
        # Budgets the memory limit sets: a request more than they let one request hold is refused.
        self._bounding = [
            budget
            for budget, name in ((self.pixels, "max_pixels_in_flight"), (self.tokens, "max_tokens_in_flight"))
            if self.memory is not None and getattr(config, name) is None
        ]

    def _memory_budgets(self) -> MemoryBudgets | None:
        """The budgets ``memory_limit`` allows beside the loaded model (None: no limit)."""
        limit = self.config.memory_limit
        if limit is None:
            return None
        loaded = self.extractor.loaded
        info = self.extractor.info()
        workers = self.config.preprocess_workers + self.batcher.lanes.count
        baseline = baseline_bytes(weight_bytes(loaded.model), workers, resident_bytes())
        per_token = activation_bytes_per_token(max(info.hidden_size, info.vision_hidden_size), loaded.dtype.itemsize)
        running = self.batcher.lanes.count * self.batcher.max_tokens
        budgets = MemoryBudgets.derive(limit, baseline, per_token, running)
        log.info(
            "memory limit %.2f GiB, %.2f GiB of it the model and runtime: budgets of %d tokens, %d pixels, "
            "%d result bytes, %d request bytes in flight",
            limit / (1 << 30),
            baseline / (1 << 30),
            budgets.tokens,
            budgets.pixels,
            budgets.result_bytes,
            budgets.request_bytes,
        )
        return budgets

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
            OverloadedError: refused at once: the server is at capacity (reason ``queue``), the work
                ahead would keep the request past its deadline (``deadline``; see
                :mod:`~.admission.wait_estimate`), or memory cannot hold it (``memory``).
            DeadlineExceededError: the deadline passed while queued or waiting for a budget.
            DeviceOutOfMemoryError: the model ran out of memory on this request.
        """
        plan = self.plan(request)  # unknown outputs and limits fail before any decoding
        admission = self.admission
        try:
            if self._in_flight >= self.config.admitted:
                raise OverloadedError(
                    f"the server is at capacity ({self._in_flight} requests in flight); retry later",
                    retry_after=admission.retry_after(),
                )
            size = sum(map(len, request.images)) + len(request.text)
            admission.take_bytes(size)
        except OverloadedError as error:
            admission.refused(error)
            raise
        self._in_flight += 1
        held: dict[Budget, int] = {}
        admitted: Admitted | None = None  # counted as work ahead of later requests
        footprint = 0  # bytes of pixels and tokens it held, to give back after a large one
        try:
            started = time.perf_counter()
            # Headers only, on threads of their own: never queued behind the decoding of large images,
            # so a request is admitted or refused within moments of arriving.
            loop = asyncio.get_running_loop()
            estimate = await loop.run_in_executor(self._estimating, self._estimate, request, plan)
            self._check_fits(estimate)
            admitted = admission.admit(estimate.tokens, deadline)
            footprint = 3 * estimate.pixels + PROCESSOR_BYTES_PER_TOKEN * estimate.tokens
            held[self.pixels] = await self.pixels.acquire(estimate.pixels, deadline)
            held[self.tokens] = await self.tokens.acquire(estimate.tokens, deadline)
            prepared, work = await self._in_worker(self._timed_prepare, request, plan)
            self._give_back(held, self.pixels)  # the decoded images are gone
            held[self.result_bytes] = await self.result_bytes.acquire(self.extractor.result_bytes(prepared), deadline)
            if observer is not None:
                observer.preprocessed(time.perf_counter() - started)
            result, timing = await self.batcher.submit_timed(prepared, deadline)
            admission.left(admitted, self._work_seconds(work, timing))
            admitted = None
            # Its pixel values (4.6 KiB a patch) are done with: not kept while a slow reader is sent
            # the result (up to --send-timeout), where no budget counts them.
            del prepared
            self._give_back(held, self.tokens)
            if observer is not None:
                observer.batched(timing)
            yield result
        except OverloadedError as error:
            admission.refused(error)
            raise
        finally:
            if admitted is not None:
                admission.left(admitted, None)
            for budget in list(held):
                self._give_back(held, budget)
            admission.give_bytes(size)
            self._in_flight -= 1
            trim_after = self.config.trim_after_bytes
            if trim_after is not None and footprint >= trim_after and not self._trimming:
                self._trimming = True
                try:
                    self._preprocess.submit(self._trim)
                except RuntimeError:  # closed: the process is ending anyway
                    self._trimming = False

    def _work_seconds(self, preprocessing: float, timing: BatchTiming) -> float:
        """A finished request's work in seconds of the whole model (see :mod:`~.admission.wait_estimate`):
        its preprocessing on one thread, and its share of its batch's run, which had a lane's share of
        the threads when other requests were in flight (all of them when it ran alone)."""
        lanes = self.batcher.lanes
        width = 1.0 if self.admission.waits.requests <= 1 else 1 / lanes.count
        return preprocessing / lanes.threads + timing.model / timing.batch_size * width

    async def calibrate(self) -> list[tuple[int, float]]:
        """Measure a few sizes before serving (:mod:`~.admission.calibration`): their tokens, seconds."""

        def tokens(request: EncodedRequest) -> int:
            return self._estimate(request, self.plan(request)).tokens

        return await calibrate(self.run, tokens, self.admission.waits, self.config.calibration_seconds)

    def _trim(self) -> None:
        try:
            allocator.trim()
        finally:
            self._trimming = False

    def _check_fits(self, estimate: Estimate) -> None:
        """Refuse a request more than the budgets set by the memory limit let one request hold (their
        share for a large one); a budget set otherwise lets such a request take that share and run alone."""
        for budget in self._bounding:
            amount = estimate.pixels if budget is self.pixels else estimate.tokens
            if budget.share(amount) < amount:
                raise OverloadedError(
                    f"the request needs {amount} {budget.what}, more than the server's memory limit lets one "
                    f"request hold ({budget.share(amount)}); send fewer or smaller images",
                    reason="memory",
                )

    @staticmethod
    def _give_back(held: dict[Budget, int], budget: Budget) -> None:
        if budget in held:
            budget.release(held.pop(budget))

    async def _in_worker(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._preprocess, function, *args)

    def _estimate(self, request: EncodedRequest, plan: OutputPlan) -> Estimate:
        return cast(Estimate, self._hinted(estimate_request, self.extractor, request, self.config.limits, plan))

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
        self._estimating.shutdown(wait=False, cancel_futures=True)

    def _start_worker(self) -> None:
        single_threaded_torch()  # the processor's torch ops must not slow the model lanes down
        # Each worker thread tokenizes with a processor of its own: fast tokenizers are not safe to
        # share between threads (huggingface/tokenizers#537).
        self._local.processor = copy.deepcopy(self.extractor.loaded.processor)

    def _timed_prepare(self, request: EncodedRequest, plan: OutputPlan) -> tuple[Prepared, float]:
        """:meth:`_prepare` of an estimated request, and its seconds on this worker."""
        started = time.perf_counter()
        prepared = self._prepare(request, plan, estimated=True)
        return prepared, time.perf_counter() - started

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
