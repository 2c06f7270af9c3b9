"""Prometheus metrics of one server, in a registry of its own, and their HTTP exposition.

Every server records into a :class:`Metrics` (cheap: a few counters per request); the HTTP
endpoint exists only when asked for (``serve --metrics-port``). A registry per server, not
prometheus_client's global one, so that several servers in one process (tests, notebooks) never
share or collide on a metric.

Durations are in seconds (Prometheus convention); names start with ``qwen25vl_embed_``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from qwen25vl_embed_server.core.admission.overload import REASONS, Admission
from qwen25vl_embed_server.rpc.metrics_http import MetricsHTTPServer

log = logging.getLogger(__name__)

PREFIX = "qwen25vl_embed"
METHODS = ("Extract", "ExtractBatch")
# From a small request on a GPU (ms) to many large images on a CPU (minutes).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """The server's metrics. Record through the methods; read ``registry`` (or scrape it).

    Metric names (counters end in ``_total`` on the wire):

    ``requests_total{method,status}``
        finished requests (an Extract call, or one request of an ExtractBatch stream) by gRPC
        status name: OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, CANCELLED, ...
    ``requests_in_progress{method}``
        requests started and not finished.
    ``request_duration_seconds{method}``
        whole request on the server, from its start to the last response handed to gRPC.
    ``preprocess_duration_seconds`` / ``queue_duration_seconds`` / ``serialize_duration_seconds``
        per request: decoding + processor; waiting in the batching queue; building and writing
        the response messages.
    ``model_duration_seconds``
        per batch: one model run (forwards, pooling, copies to the host).
    ``batch_size`` / ``batch_images``
        per batch: requests and images in it.
    ``images_total`` / ``tokens_total``
        images and LM input tokens (T, prompt and image tokens) of the requests that succeeded.
    ``queue_depth``
        requests waiting for the model now.
    ``model_load_seconds``
        how long loading the model took (0 until it is loaded).
    ``refusals_total{reason}``
        requests refused at once for overload, by reason: ``deadline`` (the work ahead would keep
        it past its deadline), ``queue`` (requests in flight or queued at their bound), ``memory``
        (the memory limit's budgets cannot hold it).
    ``estimated_wait_seconds``
        how long a small request arriving now would wait for the work ahead of it, from what the
        server measured per request size (requests of sizes not measured yet count 0).
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, process_metrics: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests", "Finished requests by method and gRPC status.", ["method", "status"], registry=r
        )
        self.in_progress = Gauge(
            f"{PREFIX}_requests_in_progress", "Requests started and not finished.", ["method"], registry=r
        )
        self.request_seconds = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Whole request on the server, until its last response was handed to gRPC.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.preprocess_seconds = Histogram(
            f"{PREFIX}_preprocess_duration_seconds",
            "Image decoding and the processor, per request (waiting for a worker included).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            f"{PREFIX}_queue_duration_seconds",
            "Time in the batching queue, per request.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_seconds = Histogram(
            f"{PREFIX}_model_duration_seconds", "One model run, per batch.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.serialize_seconds = Histogram(
            f"{PREFIX}_serialize_duration_seconds",
            "Building and writing the response messages, per request.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size", "Requests per model batch.", buckets=COUNT_BUCKETS, registry=r
        )
        self.batch_images = Histogram(
            f"{PREFIX}_batch_images", "Images per model batch.", buckets=COUNT_BUCKETS, registry=r
        )
        self.images = Counter(f"{PREFIX}_images", "Images of the requests that succeeded.", registry=r)
        self.tokens = Counter(
            f"{PREFIX}_tokens", "LM input tokens (prompt and image tokens) of the requests that succeeded.", registry=r
        )
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Requests waiting for the model.", registry=r)
        self.model_load_seconds = Gauge(
            f"{PREFIX}_model_load_seconds", "Time taken to load the model (0 until loaded).", registry=r
        )
        self.admission = _AdmissionCollector()
        r.register(self.admission)
        for method in METHODS:  # series that dashboards expect exist before the first request
            self.requests.labels(method, "OK")
            self.in_progress.labels(method)
        if process_metrics:
            ProcessCollector(registry=r)  # CPU, memory, open files (Linux)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self._http: MetricsHTTPServer | None = None

    # --- recording ------------------------------------------------------------------------------

    def request_started(self, method: str) -> None:
        self.in_progress.labels(method).inc()

    def request_finished(self, method: str, status: str, seconds: float) -> None:
        self.in_progress.labels(method).dec()
        self.requests.labels(method, status).inc()
        self.request_seconds.labels(method).observe(seconds)

    def request_succeeded(self, images: int, tokens: int) -> None:
        self.images.inc(images)
        self.tokens.inc(tokens)

    def batch_ran(self, requests: int, images: int, seconds: float) -> None:
        """One model run (the batcher's observer interface)."""
        self.batch_size.observe(requests)
        self.batch_images.observe(images)
        self.model_seconds.observe(seconds)

    def watch_queue(self, depth: Callable[[], int]) -> None:
        """Report ``depth()`` as the queue depth at every scrape."""
        self.queue_depth.set_function(lambda: float(depth()))

    def watch_admission(self, admission: Admission) -> None:
        """Report ``admission``'s refusals and estimated wait at every scrape."""
        self.admission.source = admission

    def model_loaded(self, seconds: float) -> None:
        self.model_load_seconds.set(seconds)

    # --- exposition -----------------------------------------------------------------------------

    @property
    def http_port(self) -> int | None:
        """The port of the HTTP endpoint; None when it does not run."""
        return None if self._http is None else int(self._http.server_port)

    def serve_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over plain HTTP (no TLS, no authentication): a few threads, idle
        connections closed (:class:`~.metrics_http.MetricsHTTPServer`).

        Returns:
            the bound port (``port`` 0 picks a free one).
        """
        if self._http is not None:
            raise RuntimeError("the metrics endpoint is already running")
        self._http = MetricsHTTPServer(host.strip("[]"), port, self.registry)
        return self._http.server_port

    def stop_http(self) -> None:
        """Stop the HTTP endpoint, if it runs."""
        if self._http is not None:
            self._http.close()
            self._http = None


class _AdmissionCollector(Collector):
    """The pipeline's refusals by reason and its estimated wait, read at each scrape
    (zeros until a pipeline is watched)."""

    def __init__(self) -> None:
        self.source: Admission | None = None

    def collect(self) -> Iterator[Metric]:
        source = self.source
        refusals = CounterMetricFamily(
            f"{PREFIX}_refusals", "Requests refused at once for overload, by reason.", labels=["reason"]
        )
        for reason in REASONS:
            refusals.add_metric([reason], source.refusals[reason] if source else 0)
        yield refusals
        yield GaugeMetricFamily(
            f"{PREFIX}_estimated_wait_seconds",
            "Estimated wait of a small request arriving now for the work ahead of it.",
            value=source.estimated_wait() if source else 0.0,
        )
