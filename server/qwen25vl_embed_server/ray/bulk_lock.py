"""One bulk job per output folder: an exclusive ``flock`` on the folder itself.

The lock lives on the folder's open file description, so it is held by every process holding
that descriptor: the driver, and the watchdog of the local Ray it starts
(:mod:`~qwen25vl_embed_server.ray.watchdog`). A run that ends unlocks it (for both); a killed
driver cannot, and the watchdog's copy then keeps it until the last Ray process of the run is
gone. A rerun started right after a SIGKILL therefore waits for the killed run's writers to
be dead before it reads what is done; two jobs on one folder never write at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# Longer than the watchdog needs to kill and reap a killed run's processes (a few seconds).
WAIT_S = 30.0


@contextlib.contextmanager
def locked_output(output: Path, wait_s: float = WAIT_S) -> Iterator[int]:
    """Create ``output`` if needed and hold its lock; yields the locked descriptor. A folder this
    created and left empty (the job stopped before writing) is removed again.

    Raises:
        ValueError: another job held the folder for ``wait_s`` seconds, or it is not a folder.
    """
    if output.exists() and not output.is_dir():
        raise ValueError(f"the output {output} is not a folder")
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(output, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _acquire(descriptor, output, wait_s)
        yield descriptor
    finally:
        # Unlocking releases the lock for every holder of the descriptor, the watchdog included:
        # this run is over. A killed driver never gets here; the watchdog's copy then holds it.
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)
        if created and not any(output.iterdir()):
            output.rmdir()


def _acquire(descriptor: int, output: Path, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    waited = False
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"{output} is in use by another bulk job (one job per output folder); "
                    "wait for it to end, or choose another folder"
                ) from None
            if not waited:
                log.warning("%s is in use by another bulk job; waiting up to %.0f s", output, wait_s)
                waited = True
            time.sleep(0.2)
