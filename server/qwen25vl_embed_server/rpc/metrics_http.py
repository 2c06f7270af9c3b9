"""The ``/metrics`` HTTP endpoint: prometheus_client's handler on a server with bounded threads.

prometheus_client's own ``start_http_server`` starts one thread per connection and never times a
connection out: 300 half-open connections were 312 threads. Here a fixed pool of ``workers``
threads serves connections; at most ``max_pending`` more wait for a worker (beyond, a new
connection is closed at once); a connection that sends nothing for ``idle_seconds`` is closed.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler

DEFAULT_WORKERS = 4
DEFAULT_MAX_PENDING = 32
DEFAULT_IDLE_SECONDS = 5.0


class MetricsHTTPServer(socketserver.TCPServer):
    """Serves ``registry`` over HTTP at ``host:port`` (port 0: a free one) on a daemon thread."""

    allow_reuse_address = True
    request_queue_size = 128  # the listen backlog (5 by default): beyond it, connects stall in SYN retries

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        workers: int = DEFAULT_WORKERS,
        max_pending: int = DEFAULT_MAX_PENDING,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
    ) -> None:
        handler = type("Handler", (MetricsHandler.factory(registry),), {"timeout": idle_seconds})
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), handler)
        self.server_port = int(self.server_address[1])
        self.max_pending = workers + max_pending
        self._open = 0  # connections being served or waiting for a worker
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="metrics-http")
        self._thread = threading.Thread(target=self.serve_forever, name="metrics-http-accept", daemon=True)
        self._thread.start()

    @property
    def open_connections(self) -> int:
        return self._open

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            if self._open >= self.max_pending:
                self.shutdown_request(request)  # full: refuse rather than queue without bound
                return
            self._open += 1
        self._pool.submit(self._serve, request, client_address)

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # a client's broken connection must not end the worker
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._lock:
                self._open -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # socketserver prints tracebacks to stderr; a dropped scrape is not worth one

    def close(self) -> None:
        """Stop accepting, close the socket, let the workers finish their connections."""
        self.shutdown()
        self.server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)
