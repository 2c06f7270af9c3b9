"""One request's observation: where its time went, its metrics, and its line in the request log.

The RPCs (:mod:`.calls`) open a :class:`RequestObservation` when they start on a request (an
Extract call, or one request of an ExtractBatch stream), hand it to the pipeline as its stage
observer, and finish it exactly once, whatever the outcome.

The request log is the logger ``qwen25vl_embed_server.requests``: one INFO line per request, its
fields also attached to the record (``extra``) for structured formatters (``--log-format json``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed_server.core.errors import CLIENT_TEXT_CHARS, quoted
from qwen25vl_embed_server.core.scheduling.batcher import BatchTiming
from qwen25vl_embed_server.rpc.error_mapping import status_for
from qwen25vl_embed_server.rpc.metrics import Metrics

request_log = logging.getLogger("qwen25vl_embed_server.requests")

CANCELLED = "CANCELLED"

# Client strings (request ids, output names) are written as they are when they look like this,
# else quoted and cut (:func:`quoted`): a log line is one line, of bounded length.
_PLAIN = re.compile(rf"[A-Za-z0-9_.:/+-]{{1,{CLIENT_TEXT_CHARS}}}")
_LOGGED_OUTPUTS = 16


def loggable(text: str) -> str:
    """``text`` from a client as a log line shows it."""
    return text if _PLAIN.fullmatch(text) else quoted(text)


def _loggable_outputs(outputs: Sequence[str]) -> list[str]:
    shown = [loggable(name) for name in outputs[:_LOGGED_OUTPUTS]]
    if len(outputs) > _LOGGED_OUTPUTS:
        shown.append(f"... ({len(outputs)} outputs)")
    return shown


@dataclass
class RequestObservation:
    """Timings (seconds, None for a stage not reached) and outcome of one request."""

    method: str
    request_id: str
    images: int
    outputs: Sequence[str]
    metrics: Metrics
    started: float = field(default_factory=time.perf_counter)
    preprocess: float | None = None
    queue: float | None = None
    model: float | None = None
    batch_size: int = 0
    ready: float | None = None  # from the start until the outputs were ready to send
    serialize: float | None = None
    tokens: int = 0
    status: str = "OK"
    error: str = ""
    _finished: bool = False

    @classmethod
    def begin(
        cls, method: str, request_id: str, images: int, outputs: Sequence[str], metrics: Metrics
    ) -> RequestObservation:
        """Start observing a request."""
        observation = cls(method, request_id, images, tuple(outputs), metrics)
        metrics.request_started(method)
        return observation

    def preprocessed(self, seconds: float) -> None:
        """Preprocessing took ``seconds``."""
        self.preprocess = seconds
        self.metrics.preprocess_seconds.observe(seconds)

    def batched(self, timing: BatchTiming) -> None:
        self.queue, self.model, self.batch_size = timing.queued, timing.model, timing.batch_size
        self.metrics.queue_seconds.observe(timing.queued)

    def outputs_ready(self, sequence_length: int) -> None:
        self.ready = time.perf_counter() - self.started
        self.tokens = sequence_length

    def serialized(self, started: float) -> None:
        """The response messages, begun at ``started``, are all handed to gRPC."""
        self.serialize = time.perf_counter() - started
        self.metrics.serialize_seconds.observe(self.serialize)

    def timings(self) -> pb.Timings:
        """The timings so far, for ResponseMetadata (milliseconds)."""
        return pb.Timings(
            queue_ms=(self.queue or 0.0) * 1000,
            preprocess_ms=(self.preprocess or 0.0) * 1000,
            model_ms=(self.model or 0.0) * 1000,
            total_ms=(self.ready or 0.0) * 1000,
            batch_size=self.batch_size,
        )

    def failed(self, error: BaseException, cancelled: tuple[str, str] = (CANCELLED, "the caller went away")) -> None:
        """Record the outcome of a request that raised ``error``; ``cancelled``: the status the
        caller received, and why, when the call was cancelled under it (the transport knows: its
        deadline passed, the server stopped, or the caller cancelled)."""
        if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            self.status, self.error = cancelled
        else:
            code, details = status_for(error)
            self.status, self.error = code.name, details

    def finish(self) -> None:
        """Record the metrics and write the request's log line (once; later calls do nothing)."""
        if self._finished:
            return
        self._finished = True
        seconds = time.perf_counter() - self.started
        self.metrics.request_finished(self.method, self.status, seconds)
        if self.status == "OK":
            self.metrics.request_succeeded(self.images, self.tokens)
        fields = self.log_fields(seconds)
        request_log.info(
            "%s id=%s images=%d tokens=%d outputs=%s status=%s ms=%.1f%s",
            self.method,
            loggable(self.request_id) if self.request_id else "-",
            self.images,
            self.tokens,
            ",".join(_loggable_outputs(self.outputs)),
            self.status,
            fields["ms"],
            f" error={self.error!r}" if self.error else "",
            extra=fields,
        )

    def log_fields(self, seconds: float) -> dict[str, Any]:
        """The log record's structured fields (durations in milliseconds)."""
        return {
            "method": self.method,
            "request_id": loggable(self.request_id) if self.request_id else "",
            "images": self.images,
            "tokens": self.tokens,
            "outputs": _loggable_outputs(self.outputs),
            "status": self.status,
            "ms": _ms(seconds),
            "preprocess_ms": _ms(self.preprocess),
            "queue_ms": _ms(self.queue),
            "model_ms": _ms(self.model),
            "serialize_ms": _ms(self.serialize),
            "batch_size": self.batch_size,
            "error": self.error,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
