"""The machinery behind ``extract_many``: many requests over one ExtractBatch stream, in input order.

Shared by the sync and asyncio clients: :class:`ResultCollector` turns the response stream (whose
results arrive in completion order, each tagged with its request id) into per-request results,
and :func:`in_order` releases them in input order, freeing window slots and applying the error
policy. Only the waiting (threads or asyncio) differs between the two clients.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal

import grpc

from qwen25vl_embed.assembly import ResultBuilder
from qwen25vl_embed.embeddings import Embeddings
from qwen25vl_embed.errors import EmbeddingError, LocalRequestError
from qwen25vl_embed.v1 import embed_pb2 as pb

__all__ = ["ErrorPolicy", "ResultCollector", "in_order", "progress_bar", "release", "sized"]

ErrorPolicy = Literal["raise", "return"]


class ResultCollector:
    """Assembles ExtractBatch responses whose request ids are "0", "1", ... (the input index).

    Feed every response to :meth:`add`; :meth:`ready` yields finished results in input order.
    A failed request's result is an :class:`EmbeddingError`.
    """

    def __init__(self) -> None:
        self._building: dict[int, ResultBuilder] = {}
        self._finished: dict[int, Embeddings | EmbeddingError] = {}
        self._unsent: set[int] = set()
        self._lock = threading.Lock()  # fail() may be called from the request-sending thread
        self.next_index = 0

    def fail(self, index: int, error: Exception) -> None:
        """Record a request that could not be built on this side (never sent)."""
        with self._lock:
            self._finished[index] = LocalRequestError(f"request {index}: {error}", error)
            self._unsent.add(index)

    def build(self, index: int, build: Callable[[], pb.ImageRequest]) -> pb.ImageRequest | None:
        """``build()``'s request, or None when the input is bad (TypeError, ValueError, OSError):
        then the failure is recorded in the request's place, and nothing is to be sent."""
        try:
            return build()
        except (TypeError, ValueError, OSError) as error:
            self.fail(index, error)
            return None

    def was_unsent(self, index: int) -> bool:
        """True for a request that failed on this side and so was never sent."""
        with self._lock:
            return index in self._unsent

    def add(self, response: pb.EmbeddingResponse) -> None:
        try:
            index = int(response.request_id)
        except ValueError:
            raise EmbeddingError(grpc.StatusCode.INTERNAL, f"unexpected request id {response.request_id!r}") from None
        if response.HasField("error"):
            self._building.pop(index, None)
            code = _status_code(response.error.code)
            with self._lock:
                self._finished[index] = EmbeddingError(code, f"request {index}: {response.error.message}")
            return
        builder = self._building.setdefault(index, ResultBuilder())
        builder.add(response)
        if response.last:
            result = self._building.pop(index).build()
            with self._lock:
                self._finished[index] = result

    def ready(self) -> Iterator[tuple[int, Embeddings | EmbeddingError]]:
        """(index, result) not yet released whose predecessors are all released, in input order."""
        while True:
            with self._lock:
                result = self._finished.pop(self.next_index, None)
            if result is None:
                return
            self.next_index += 1
            yield self.next_index - 1, result


def in_order(
    collector: ResultCollector, errors: ErrorPolicy, bar: Any, free_slot: Callable[[], object]
) -> Iterator[Embeddings | EmbeddingError]:
    """The results now ready, in input order: for each, ``free_slot()`` if it was sent (its window
    slot is free again), one step of the progress ``bar`` (or None), then :func:`release`."""
    for index, result in collector.ready():
        if not collector.was_unsent(index):
            free_slot()
        if bar is not None:
            bar.update(1)
        yield release(result, errors)


def release(result: Embeddings | EmbeddingError, errors: ErrorPolicy) -> Embeddings | EmbeddingError:
    """Apply the error policy: raise a failed result, or hand it over."""
    if isinstance(result, EmbeddingError) and errors == "raise":
        raise result
    return result


def progress_bar(enabled: bool, total: int | None) -> Any:
    """A tqdm bar counting images, or None when not asked for."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", dynamic_ncols=True)


def sized(items: object) -> int | None:
    """``len(items)``, or None for an iterable without one (a generator, an async iterable)."""
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


def _status_code(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN
