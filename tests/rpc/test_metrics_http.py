"""The metrics endpoint under idle and half-open connections: a bounded number of threads, idle
connections closed, scrapes still served."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from qwen25vl_embed_server.rpc.metrics import Metrics
from qwen25vl_embed_server.rpc.metrics_http import DEFAULT_WORKERS, MetricsHTTPServer


def idle_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that never send a byte."""
    return [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(count)]


def metrics_threads() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name.startswith("metrics-http"))


def test_idle_connections_do_not_each_take_a_thread() -> None:
    metrics = Metrics(process_metrics=False)
    port = metrics.serve_http("127.0.0.1", 0)
    before = threading.active_count()
    sockets = idle_connections(port, 100)
    try:
        time.sleep(0.5)  # the accept loop has seen them all (more threads would have started by now)
        assert threading.active_count() - before <= DEFAULT_WORKERS
        assert metrics_threads() <= DEFAULT_WORKERS + 1  # the workers and the accept loop
    finally:
        for sock in sockets:
            sock.close()
        metrics.stop_http()


def test_idle_connections_are_closed_and_scrapes_still_served() -> None:
    registry = CollectorRegistry()
    Counter("probe", "A counter to find in the scrape.", registry=registry).inc()
    server = MetricsHTTPServer("127.0.0.1", 0, registry, workers=2, max_pending=4, idle_seconds=0.2)
    try:
        sockets = idle_connections(server.server_port, 20)
        for sock in sockets:  # every one is closed by the server: by the idle timeout, or at once when full
            assert sock.recv(1) == b""
            sock.close()
        deadline = time.monotonic() + 10
        while server.open_connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.open_connections == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as response:
            assert "probe_total 1.0" in response.read().decode()
    finally:
        server.close()
