"""Dynamic batching across concurrent requests, in front of the model's lanes (:mod:`~.model_lanes`).

Requests queue on the event loop. Once a lane is free, the batcher takes the oldest, waits up to
``max_wait_ms`` for company, fills the batch up to ``max_images`` / ``max_tokens`` (by device),
drops requests whose caller gave up (cancelled, or the deadline passed while queued), and runs the
rest as one batch on that lane. While the lanes run, new requests queue: under load batches form
by themselves. On the CPU there are two lanes by default: a batch formed while another lane is
free too takes half of what is queued, so the two run side by side; a lone request runs wide.

Fairness: a request costing more than ``max_piece_tokens`` (a large one) runs alone and in pieces
(the vision tower a few images at a time, then the language model; :mod:`~.pieces`). Between two pieces the
requests that are small and already queued run first, in batches, so a small request waits for
one piece, not for the whole large request; requests arriving meanwhile wait for the next gap, so
the large request still advances. Large requests run one after another, oldest first; one whose
caller gave up stops at the next gap.

Each result comes with its :class:`BatchTiming` (time queued, the batch's model time); an optional
:class:`BatchObserver` hears of every model run (the server's metrics). No metrics library here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

from qwen25vl_embed_server.core.errors import DeadlineExceededError, ModelNotReadyError, OverloadedError
from qwen25vl_embed_server.core.scheduling.model_lanes import ModelLanes
from qwen25vl_embed_server.core.scheduling.model_thread import ModelThread

if TYPE_CHECKING:  # only types: keeps this module (and BatchingConfig for the CLI) free of torch
    from qwen25vl_embed_server.core.model.extractor import Extractor, Prepared
    from qwen25vl_embed_server.core.model.finishing import Extraction

log = logging.getLogger(__name__)
_T = TypeVar("_T")


# A batch's bound in tokens by device when none is given. On the CPU, batching adds no FLOPs and a
# larger batch runs slower per image (its activations outgrow the caches and are mapped afresh):
# the 'bench' model here, fp32 `onednn`, 448x448: 107 ms per image in batches of 4, 110 in 8, 147
# in 16; bf16 82 / 89 / 97. 6,144 takes four such images with the language model, six without.
CPU_BATCH_TOKENS = 6144
ACCELERATOR_BATCH_TOKENS = 32768
# Lanes by device when none is given (see core/scheduling/model_lanes.py): on an accelerator one (its kernels
# queue on one stream anyway).
CPU_LANES = 2
ACCELERATOR_LANES = 1


@dataclass(frozen=True)
class BatchingConfig:
    """Bounds of one batch and of the queue. A request larger than a bound runs alone.

    ``max_tokens``: vision patches + LM sequence per batch; None: by device (:meth:`tokens_for`).
    ``max_piece_tokens``: a request costing more (vision patches + LM sequence) runs in pieces of
    at most this many vision patches (an image larger than that is one piece), then the language
    model; 0 never splits. The default leaves whole a request of up to 12 images at 448x448 (16
    without the language model).
    ``lanes``: batches the model runs side by side (:mod:`~.model_lanes`); None: by device.
    """

    max_images: int = 32
    max_tokens: int | None = None
    max_wait_ms: float = 2.0
    max_queue: int = 256
    max_piece_tokens: int = 16384
    lanes: int | None = None

    def lanes_for(self, device_type: str) -> int:
        """Model lanes on a device of this type (at most one per torch thread, when they start)."""
        if self.lanes is not None:
            return self.lanes
        return CPU_LANES if device_type == "cpu" else ACCELERATOR_LANES

    def tokens_for(self, device_type: str) -> int:
        """The bound in tokens on a device of this type ("cpu", "cuda", "mps")."""
        if self.max_tokens is not None:
            return self.max_tokens
        return CPU_BATCH_TOKENS if device_type == "cpu" else ACCELERATOR_BATCH_TOKENS


@dataclass(frozen=True)
class BatchTiming:
    """Where one request spent its time in the batcher, in seconds.

    ``queued``: from :meth:`Batcher.submit_timed` until the model run of its batch started.
    ``model``: that run, shared by the ``batch_size`` requests of the batch.
    """

    queued: float
    model: float
    batch_size: int


class BatchObserver(Protocol):
    """Hears of every model run that succeeded (e.g. to record metrics)."""

    def batch_ran(self, requests: int, images: int, seconds: float) -> None: ...


@dataclass(eq=False)  # compared by identity: removing one from the queue must not compare tensors
class _Pending:
    item: Prepared
    future: asyncio.Future[tuple[Extraction, BatchTiming]]
    deadline: float | None  # time.monotonic() after which nobody waits for the result
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def abandoned(self) -> bool:
        return self.future.done() or (self.deadline is not None and time.monotonic() >= self.deadline)


class Batcher:
    """Owns the model's lanes. Create and use it on one event loop; :meth:`close` stops it.

    ``model_thread``: the one that loaded the model (see :mod:`~.model_thread`), the first lane;
    None: a new one.
    """

    def __init__(
        self,
        extractor: Extractor,
        config: BatchingConfig = BatchingConfig(),
        observer: BatchObserver | None = None,
        model_thread: ModelThread | None = None,
    ) -> None:
        self.extractor = extractor
        self.config = config
        self._observer = observer
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        device_type = extractor.loaded.device.type
        self.lanes = ModelLanes(model_thread or ModelThread(), config.lanes_for(device_type))
        self.max_tokens = config.tokens_for(device_type)
        self._dispatched: set[asyncio.Task[None]] = set()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")
        self.batches_run = 0

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    async def submit(self, item: Prepared, deadline: float | None = None) -> Extraction:
        """Queue ``item`` and wait for its result (see :meth:`submit_timed`)."""
        result, _ = await self.submit_timed(item, deadline)
        return result

    async def submit_timed(self, item: Prepared, deadline: float | None = None) -> tuple[Extraction, BatchTiming]:
        """Queue ``item`` and wait for its result and where it spent its time.

        Raises :class:`OverloadedError` at once when the queue is full, and
        :class:`DeadlineExceededError` when ``deadline`` (monotonic seconds) passes while queued.
        Cancelling the caller frees its place in the queue at once: the request never reaches the
        model (if its batch already runs, the result is dropped).
        """
        if len(self._queue) >= self.config.max_queue:
            raise OverloadedError(f"the server is at capacity ({self.config.max_queue} requests queued); retry later")
        pending = _Pending(item, asyncio.get_running_loop().create_future(), deadline)
        self._queue.append(pending)
        self._arrived.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            if pending in self._queue:
                self._queue.remove(pending)
            raise

    @property
    def running(self) -> bool:
        """True while a model run is in progress on a lane."""
        return self.lanes.running

    async def close(self, wait: bool = True) -> None:
        """Stop taking batches; fail what is still queued; wait for the lanes (``wait``
        False: do not wait for a model run in progress, whose callers are gone)."""
        self._task.cancel()
        for task in list(self._dispatched):
            task.cancel()
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(ModelNotReadyError("the server is shutting down; retry elsewhere"))
        self._queue.clear()
        if wait:
            await asyncio.get_running_loop().run_in_executor(None, self.lanes.shutdown)
        else:
            self.lanes.shutdown(wait=False)

    async def _loop(self) -> None:
        while True:
            try:
                lane, batch = await self._next_batch()
            except Exception as error:  # a fault of the batcher itself: fail the oldest, go on serving
                held = [self._queue.popleft()] if self._queue else []
                log.error("the batcher failed on %d request(s)", len(held), exc_info=error)
                for pending in held:
                    _settle(pending, error=error)
                continue
            task = asyncio.get_running_loop().create_task(self._dispatch(lane, batch), name="batch")
            self._dispatched.add(task)
            task.add_done_callback(self._dispatched.discard)

    async def _dispatch(self, lane: ModelThread, batch: list[_Pending]) -> None:
        """Run ``batch`` on ``lane`` (a large request: in pieces), then free the lane."""
        try:
            if len(batch) == 1 and self._large(batch[0].item):
                await self._run_large(lane, batch[0])
            elif batch:
                await self._run_batch(lane, batch)
        except Exception as error:  # a fault of the batcher itself: fail what it held, go on serving
            log.error("the batcher failed on %d request(s)", len(batch), exc_info=error)
            for pending in batch:
                _settle(pending, error=error)
        except asyncio.CancelledError:  # closing: nobody will run these any more
            for pending in batch:
                _settle(pending, error=ModelNotReadyError("the server is shutting down; retry elsewhere"))
            raise
        finally:
            self.lanes.release(lane)

    async def _call(self, lane: ModelThread, function: Callable[..., _T], *args: object) -> _T:
        """``function(*args)`` on ``lane``; wide when no request waits (see :mod:`~.model_lanes`)."""
        return await self.lanes.call(lane, function, *args, alone=not self._queue)

    async def _run_batch(self, lane: ModelThread, batch: list[_Pending]) -> None:
        """Run one batch on ``lane`` and settle its requests (alone, one by one, if it fails)."""
        started = time.monotonic()
        try:
            results, seconds = await self._call(lane, self._run, [p.item for p in batch])
        except Exception as error:  # one failing batch: retry its requests one by one
            if len(batch) > 1:
                log.warning("a batch of %d failed (%s); running its requests alone", len(batch), error)
                await self._run_alone(lane, batch)
            else:
                _settle(batch[0], error=error)
            return
        self.batches_run += 1
        self._ran(batch, seconds)
        for pending, result in zip(batch, results, strict=True):
            _settle(pending, result=(result, BatchTiming(started - pending.enqueued, seconds, len(batch))))

    async def _run_alone(self, lane: ModelThread, batch: list[_Pending]) -> None:
        for pending in batch:
            if pending.abandoned:
                continue
            started = time.monotonic()
            try:
                results, seconds = await self._call(lane, self._run, [pending.item])
            except Exception as error:
                _settle(pending, error=error)
            else:
                self._ran([pending], seconds)
                _settle(pending, result=(results[0], BatchTiming(started - pending.enqueued, seconds, 1)))

    async def _run_large(self, lane: ModelThread, pending: _Pending) -> None:
        """Run one large request piece by piece on ``lane``; between pieces, the small requests
        queued then (on the same lane: other lanes take from the queue meanwhile)."""
        if self.extractor.pieces(pending.item, self.config.max_piece_tokens) == 1:  # one image, or text
            await self._run_batch(lane, [pending])
            return
        started = time.monotonic()
        run = self.extractor.run_in_pieces(pending.item, self.config.max_piece_tokens)
        seconds = 0.0
        result: Extraction | None = None
        for piece in range(run.pieces):
            if piece:
                await self._run_waiting(lane)
                if pending.abandoned:  # its caller gave up: free the device for the others
                    _settle(pending, error=DeadlineExceededError("the deadline passed while the request ran"))
                    return
            try:
                result, took = await self._call(lane, self._timed, run.step)
            except Exception as error:
                _settle(pending, error=error)
                return
            seconds += took
            log.debug("piece %d/%d of a large request ran in %.3f s", piece + 1, run.pieces, took)
        assert result is not None, "the last piece returns the result"
        self.batches_run += 1
        self._ran([pending], seconds)
        _settle(pending, result=(result, BatchTiming(started - pending.enqueued, seconds, 1)))

    async def _run_waiting(self, lane: ModelThread) -> None:
        """Run, in batches on ``lane``, the small requests queued now (not those that arrive meanwhile)."""
        waiting = [pending for pending in self._queue if not self._large(pending.item)]
        while waiting:
            batch = self._form(waiting)
            if batch:
                await self._run_batch(lane, batch)
            waiting = [pending for pending in waiting if pending in self._queue]

    def _run(self, items: Sequence[Prepared]) -> tuple[list[Extraction], float]:
        """The model run and its duration (on a lane, so no event-loop hop is counted)."""
        return self._timed(lambda: self.extractor.run(items))

    @staticmethod
    def _timed(work: Callable[[], _T]) -> tuple[_T, float]:
        """``work()`` (on a lane) and how long it took."""
        started = time.monotonic()
        result = work()
        return result, time.monotonic() - started

    def _ran(self, batch: list[_Pending], seconds: float) -> None:
        if self._observer is not None:
            images = sum(_images(p.item) for p in batch)
            self._observer.batch_ran(len(batch), images, seconds)

    async def _next_batch(self) -> tuple[ModelThread, list[_Pending]]:
        """Wait for a request and a free lane (and for a wide run to end: requests stay queued,
        and cancellable, meanwhile), take the lane, then wait for company (bounded by max_wait_ms
        and the batch bounds); the lane and the batch.

        With other lanes free, the batch takes its share of what is queued (half, with one other
        free), so that they run too; the first share is the larger one."""
        while not self._queue or self.lanes.wide or not self.lanes.free:
            if self._queue:
                await self.lanes.changed()
            else:
                self._arrived.clear()
                await self._arrived.wait()
        lane = self.lanes.take()
        try:
            cutoff = time.monotonic() + self.config.max_wait_ms / 1000
            while not self._full() and (remaining := cutoff - time.monotonic()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            candidates = list(self._queue)
            return lane, self._form(candidates, -(-len(candidates) // (1 + self.lanes.free)))
        except BaseException:
            self.lanes.release(lane)
            raise

    def _form(self, candidates: list[_Pending], most: int | None = None) -> list[_Pending]:
        """The next batch from ``candidates`` (queued, oldest first), taken out of the queue; at most
        ``most`` requests (None: as many as the bounds allow).

        Abandoned candidates are failed on the way. A large request runs alone: it ends the batch,
        or is the batch when it comes first.
        """
        batch: list[_Pending] = []
        images = tokens = 0
        for pending in candidates:
            if pending.abandoned:
                self._queue.remove(pending)
                _settle(pending, error=DeadlineExceededError("the deadline passed while the request was queued"))
                continue
            item = pending.item
            n_images = _images(item)
            large = self._large(item)
            if batch and (
                large
                or images + n_images > self.config.max_images
                or tokens + item.cost > self.max_tokens
                or (most is not None and len(batch) >= most)
            ):
                break
            self._queue.remove(pending)
            batch.append(pending)
            images, tokens = images + n_images, tokens + item.cost
            if large:
                break
        return batch

    def _large(self, item: Prepared) -> bool:
        """True when ``item`` costs more than a piece: it runs alone, in pieces where it can (a
        single image or a text request is one piece), never in the gaps between pieces."""
        return 0 < self.config.max_piece_tokens < item.cost

    def _full(self) -> bool:
        """True when the queued requests already fill a batch: no reason to wait for more."""
        images = sum(_images(p.item) for p in self._queue)
        tokens = sum(p.item.cost for p in self._queue)
        return images >= self.config.max_images or tokens >= self.max_tokens


def _images(item: Prepared) -> int:
    return int(item.image_grid_thw.shape[0])


def _settle(
    pending: _Pending, result: tuple[Extraction, BatchTiming] | None = None, error: BaseException | None = None
) -> None:
    if pending.future.done():  # the caller went away
        return
    if error is not None:
        pending.future.set_exception(error)
    else:
        pending.future.set_result(result)  # type: ignore[arg-type]
