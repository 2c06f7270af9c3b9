"""A local Ray ends with the driver that started it, however the driver ends (SIGKILL included).

``ray.init`` starts a local Ray's GCS, raylet, dashboard and monitors as children of the driver
with ``PR_SET_PDEATHSIG``: they die with it. What the raylet starts does not: its workers (Ray
Data's actors and write tasks, which write the bulk job's output) and its agents notice the
raylet's end only by polling. Seen here after a SIGKILL of ``bulk``'s driver: a Parquet file
finished 2 s later, and the dashboard and runtime-env agents lived a minute on; a rerun started
meanwhile could read the output before that file landed, and write those images again.

The watchdog is a small process the driver starts right after ``ray.init`` (Linux only: it reads
``/proc``). It holds the read end of a pipe whose write end only the driver has, and records every
``_POLL_S`` every process below the ones ``ray.init`` started. When the pipe ends (the driver is
gone, killed or exited) it SIGKILLs each recorded process still alive (same pid *and* start time,
so a reused pid is never hit), waits until they are gone, and exits. The file descriptors it is
given (the bulk job's lock on its output folder) close only then, so no rerun starts while a
process of the killed run lives. It runs in a session of its own: Ctrl-C in a terminal reaches the
driver (which shuts Ray down itself), not the watchdog.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

# A scan of /proc costs a few ms: about 1% of a core at this rate, for as long as Ray runs. A
# worker started in the last interval before the driver died is missed; it ends on its own when it
# finds its raylet gone (seconds).
_POLL_S = 0.5
# How long the watchdog waits for the killed processes to be gone (SIGKILL is not ignorable; a
# process in uninterruptible sleep, on a hung device, is the only one that outlives this).
_REAP_S = 10.0
_write_ends: list[int] = []  # the driver's ends of the pipes: open until this process ends


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` now."""
    return {child for child, (parent, _) in _processes().items() if parent == pid}


def start_watchdog(roots: Iterable[int], hold: Sequence[int] = ()) -> int:
    """Start the watchdog over ``roots`` (the processes ``ray.init`` started) and everything below
    them; it also holds ``hold`` (file descriptors) until they are all gone. Returns its pid."""
    read, write = os.pipe()  # both non-inheritable: Ray's processes never hold the write end
    process = subprocess.Popen(
        [sys.executable, "-m", __name__, *map(str, roots)],
        stdin=read,
        pass_fds=tuple(hold),
        start_new_session=True,
    )
    os.close(read)
    _write_ends.append(write)
    return process.pid


def _processes() -> dict[int, tuple[int, int]]:
    """Every living process: pid -> (parent pid, start time in clock ticks since boot). A zombie
    (ended, not yet reaped by its parent) is not living."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if fields[0] != "Z":
            found[int(stat.parent.name)] = (int(fields[1]), int(fields[19]))
    return found


def _record(known: dict[int, int]) -> None:
    """Add to ``known`` (pid -> start time) every living process below one of them."""
    processes = _processes()
    alive = {pid for pid, start in known.items() if processes.get(pid, (0, -1))[1] == start}
    grew = True
    while grew:
        grew = False
        for pid, (parent, start) in processes.items():
            if parent in alive and pid not in known:
                known[pid] = start
                alive.add(pid)
                grew = True


def _kill(known: dict[int, int]) -> None:
    deadline = time.monotonic() + _REAP_S
    while time.monotonic() < deadline:
        processes = _processes()
        alive = [pid for pid, start in known.items() if processes.get(pid, (0, -1))[1] == start]
        if not alive:
            return
        for pid in alive:
            with contextlib.suppress(OSError):  # ended meanwhile
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _watch(roots: list[int]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    processes = _processes()
    known = {pid: processes[pid][1] for pid in roots if pid in processes}
    while True:
        _record(known)
        ready, _, _ = select.select([0], [], [], _POLL_S)
        if ready and not os.read(0, 1):  # end of file: the driver is gone
            break
    _record(known)  # what the still-living ones started last
    _kill(known)


if __name__ == "__main__":
    _watch([int(arg) for arg in sys.argv[1:]])
