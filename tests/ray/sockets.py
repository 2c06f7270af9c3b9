"""The TCP sockets of Ray's processes (this process's descendants), read with ``ss`` (iproute2)."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

_OWNER = re.compile(r'\("([^"]+)",pid=(\d+),')


@dataclass(frozen=True)
class Socket:
    process: str
    state: str
    local: str
    peer: str


def descendants(root: int) -> set[int]:
    """Every process below ``root`` (Ray's gcs_server and raylet, and the raylet's workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def sockets_of(pids: set[int]) -> list[Socket]:
    """Every TCP socket (listening or connected) that one of ``pids`` holds."""
    listing = subprocess.run(["ss", "-tanpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) < 6:
            continue
        for name, pid in _OWNER.findall(" ".join(parts[5:])):
            if int(pid) in pids:
                found.append(Socket(process=name, state=parts[0], local=parts[3], peer=parts[4]))
    return found


def is_loopback(endpoint: str) -> bool:
    """``127.0.0.1:80``, ``[::1]:80``, ``[::ffff:127.0.0.1]:80``: True; ``0.0.0.0:80``, ``*:80``,
    ``[::]:80`` (every interface) and any other address: False."""
    host = endpoint.rsplit(":", 1)[0].strip("[]").split("%", 1)[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def ray_sockets() -> list[Socket]:
    return sockets_of(descendants(os.getpid()))
