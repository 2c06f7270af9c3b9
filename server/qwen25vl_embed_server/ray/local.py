"""Starting Ray for ``serve-ray`` and ``bulk``: join a cluster, or a local Ray kept on loopback.

``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough: each Ray process that starts later
(the raylet's workers, Serve's controller and proxies, Ray Data's actors) asks
``ray._private.services.get_node_ip_address()`` for its own address, which picks the machine's
outward-facing one, and talks over it. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is Ray's own
switch for "no multi-node cluster" (``ray_constants.ENABLE_RAY_CLUSTER``, on by default on Linux,
off on macOS and Windows): with it off, that function answers loopback in every process. Set in
this process's environment before ``ray.init``, every Ray process started from here inherits it.
Ray reads it once, when ``ray`` is imported: in this (driver) process, which has usually imported
``ray`` already, the value read then is brought in line as well, or the driver would still hand
the outward address to the GCS and raylet it starts (seen here: both listened on it).

A local Ray also ends with this process, however it ends: see
:mod:`~qwen25vl_embed_server.ray.watchdog`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

LOOPBACK = "127.0.0.1"
LOCAL_ONLY_ENV: Mapping[str, str] = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""The environment that keeps a local Ray's processes on loopback."""


def starts_local_ray(address: str | None) -> bool:
    """True when ``ray.init(address=address)`` would start a new local Ray (no address given,
    none in ``RAY_ADDRESS``)."""
    return address is None and not os.environ.get("RAY_ADDRESS")


def init_ray(address: str | None = None, *, hold: Sequence[int] = (), **options: Any) -> None:
    """``ray.init``: join ``address`` (or ``RAY_ADDRESS``) as given; else start a local Ray whose
    every process listens and talks on 127.0.0.1 only, and which ends with this process (on Linux:
    a watchdog kills what is left of it; ``hold``, file descriptors, stay open until that is
    done). ``options`` go to ``ray.init``."""
    import ray

    from qwen25vl_embed_server.ray.watchdog import children, start_watchdog

    if not starts_local_ray(address):
        ray.init(address=address, **options)
        return
    os.environ.update(LOCAL_ONLY_ENV)
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # what the environment now says; read at import
    before = children(os.getpid()) if sys.platform.startswith("linux") else None
    ray.init(_node_ip_address=LOOPBACK, **options)
    if before is not None:
        start_watchdog(children(os.getpid()) - before, hold)
