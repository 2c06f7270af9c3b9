"""Deploying the Serve application: config files in, running applications out.

``qwen25vl-embed serve-ray --config FILE`` uses :func:`serve_config_file`; ``serve run FILE`` and
``serve deploy FILE`` (Ray's own CLI) read the same file. See examples/ray/serve.yaml.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from qwen25vl_embed_server.ray.deployment import SERVICER_FUNCTION
from qwen25vl_embed_server.ray.local import init_ray

log = logging.getLogger(__name__)


def load_config(source: str | Path | Mapping[str, Any]) -> ServeDeploySchema:
    """A Serve config (a YAML file's path, or its content) exposing this gRPC service.

    The servicer function is added to ``grpc_options.grpc_servicer_functions`` when missing.

    Raises:
        OSError: the file cannot be read.
        pydantic.ValidationError: not a valid Serve config.
    """
    raw = dict(source) if isinstance(source, Mapping) else yaml.safe_load(Path(source).read_text())
    grpc_options = dict(raw.get("grpc_options") or {})
    functions = list(grpc_options.get("grpc_servicer_functions") or [])
    if SERVICER_FUNCTION not in functions:
        functions.append(SERVICER_FUNCTION)
    raw["grpc_options"] = {**grpc_options, "grpc_servicer_functions": functions}
    return ServeDeploySchema.model_validate(raw)


def deploy(config: ServeDeploySchema, timeout_s: float = 900.0) -> None:
    """Start Serve (proxies as configured) and deploy ``config``'s applications, as ``serve run``
    does; return once they are RUNNING. Needs ``ray.init()`` first (or a ``RAY_ADDRESS``).

    Raises:
        RuntimeError: an application failed to deploy, or was not running within ``timeout_s``.
    """
    # Serve's public API deploys Application objects; a config file goes through the same
    # (private) client that `serve run` and `serve deploy` use, so all three behave alike.
    from ray.serve._private.api import serve_start
    from ray.serve.config import gRPCOptions

    client = serve_start(
        http_options=config.http_options.model_dump(),
        grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
        proxy_location=config.proxy_location,
    )
    client.deploy_apps(config)
    wait_until_running([app.name for app in config.applications], timeout_s)


def wait_until_running(names: list[str], timeout_s: float) -> None:
    """Poll Serve until the applications ``names`` are RUNNING.

    Raises:
        RuntimeError: one failed to deploy, or they were not all running within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        applications = serve.status().applications
        states = {name: applications.get(name) for name in names}
        failed = {name: app for name, app in states.items() if app is not None and app.status == "DEPLOY_FAILED"}
        if failed:
            messages = "; ".join(f"{name}: {app.message}" for name, app in failed.items())
            raise RuntimeError(f"deploying failed: {messages}")
        if all(app is not None and app.status == "RUNNING" for app in states.values()):
            return
        if time.monotonic() > deadline:
            pending = {name: app.status if app else "NOT_STARTED" for name, app in states.items()}
            raise RuntimeError(f"not running after {timeout_s:.0f} s: {pending}")
        time.sleep(0.5)


def serve_config_file(path: str | Path, address: str | None = None) -> None:
    """``qwen25vl-embed serve-ray --config FILE``: deploy, then serve until SIGTERM/SIGINT.

    Connects to the Ray cluster at ``address`` (or ``RAY_ADDRESS``), else starts a local one that
    stays on 127.0.0.1 (:func:`~qwen25vl_embed_server.ray.local.init_ray`).
    On a signal, Serve is shut down (as ``serve run`` does on Ctrl-C).
    """
    import ray

    config = load_config(path)
    started_ray = not ray.is_initialized()
    if started_ray:
        init_ray(address)
    # After ray.init, whose own SIGTERM handler would otherwise abort the process at exit.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        deploy(config)
        log.info(
            "serving %s through Ray Serve's gRPC proxy on port %d",
            ", ".join(app.name for app in config.applications),
            config.grpc_options.port,
        )
        stop.wait()
        log.info("shutting down Serve")
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()


__all__ = ["deploy", "load_config", "serve_config_file", "wait_until_running"]
