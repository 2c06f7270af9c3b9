"""One memory limit, from which the server-wide budgets derive.

The limit (``serve --memory-limit``; by default :data:`DEFAULT_MEMORY_SHARE` of the memory the
process may use: its cgroup's limit, v2 ``memory.max`` or v1 ``memory.limit_in_bytes``, else the
machine's ``MemTotal``) covers the whole process. What the process holds once the model is loaded
(:func:`baseline_bytes`: its resident memory then, or the weights on the CPU plus the runtime if
more, plus room for the worker threads) comes off first; the rest, the *room*, is shared among the
budgets of the memory bound (``docs/security.md``):

- decoded pixels being preprocessed (3 bytes each as RGB): :data:`PIXEL_SHARE` of the room;
- tokens between decoding and the end of their model run (the processor's 9 KiB per token, plus
  the model's activation bytes per token of the batches running at once, ``--model-lanes`` x
  ``--batch-max-tokens``): :data:`TOKEN_SHARE`;
- bytes of results held until sent: :data:`RESULT_SHARE`;
- bytes of request messages in flight (the images' encoded bytes, held from admission to the end
  of the call): :data:`REQUEST_SHARE`.

No torch here: the weights are counted from the loaded model's tensors by the caller's objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
DEFAULT_MEMORY_SHARE = 0.75
"""The default limit's share of the memory the process may use (its cgroup's limit, else the machine's)."""
PIXEL_SHARE, TOKEN_SHARE, RESULT_SHARE, REQUEST_SHARE = 0.2, 0.35, 0.2, 0.25
PROCESSOR_BYTES_PER_TOKEN = 9 * KIB
"""The processor's peak per vision patch: its float32 copy of the resized image and two of the patches."""
RUNTIME_BYTES = 384 * MIB
"""Python, torch, transformers and gRPC loaded, beside the weights (measured: the tiny model's
``serve`` resides in about 330 MiB)."""
WORKER_BYTES = 32 * MIB
"""Each preprocessing thread and model lane: its processor copy, stack and malloc arena."""
SMALLEST_ROOM = 64 * MIB
"""Less room than this beside the model is refused: no budget could hold a request."""

_CGROUP = Path("/sys/fs/cgroup")
_UNITS = {"": 1, "k": KIB, "m": MIB, "g": GIB, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes of ``text``: a number with an optional binary unit (``12G``, ``12GiB``, ``800M``, ``1500000000``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if match is None:
        raise ValueError(f"expected a size such as 12G, 800MiB or a number of bytes, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():  # "max": no limit
        return None
    value = int(text)
    return value if value < 1 << 60 else None  # v1 writes a huge number for "no limit"


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """The process's cgroup path by hierarchy: ``"v2"`` (the ``0::`` line) and ``"memory"`` (v1)."""
    paths: dict[str, str] = {}
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        number, controllers, path = [*line.split(":", 2), "", ""][:3]
        if number == "0" and not controllers:
            paths["v2"] = path
        elif "memory" in controllers.split(","):
            paths["memory"] = path
    return paths


def _with_parents(root: Path, path: str) -> list[Path]:
    """``root/path`` and its folders up to ``root``: a limit anywhere above applies too."""
    folder = root / path.strip().lstrip("/")
    return [folder, *[parent for parent in folder.parents if parent.is_relative_to(root)]]


def machine_memory(
    cgroup_root: Path = _CGROUP, meminfo: Path = Path("/proc/meminfo"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> tuple[int, str]:
    """The memory this process may use and where that was read: the smallest of its cgroup's
    limits (v2 ``memory.max``, v1 ``memory.limit_in_bytes``, of its cgroup and those above it)
    and the machine's ``MemTotal``."""
    paths = _cgroup_paths(proc_cgroup)
    candidates = [folder / "memory.max" for folder in _with_parents(cgroup_root, paths.get("v2", "/"))]
    v1_root = cgroup_root / "memory"
    candidates += [folder / "memory.limit_in_bytes" for folder in _with_parents(v1_root, paths.get("memory", "/"))]
    found = [(limit, str(path)) for path in candidates if (limit := _read_limit(path)) is not None]
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                found.append((int(line.split()[1]) * KIB, f"{meminfo} MemTotal"))
    except OSError:
        pass
    if not found:
        raise OSError("cannot tell this machine's memory (no cgroup limit, no /proc/meminfo); give --memory-limit")
    return min(found)


def default_memory_limit() -> int:
    """:data:`DEFAULT_MEMORY_SHARE` of :func:`machine_memory`."""
    return int(machine_memory()[0] * DEFAULT_MEMORY_SHARE)


def resident_bytes() -> int:
    """This process's resident memory now (``VmRSS``); 0 where /proc does not tell."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KIB
    except OSError:
        pass
    return 0


def weight_bytes(model: Any) -> int:
    """Bytes of ``model``'s parameters and buffers in host memory (a torch module; those on an
    accelerator are in its memory, not the process's)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cpu")


def baseline_bytes(weights: int, workers: int, resident: int) -> int:
    """What the process holds before any request: ``resident`` (measured) or the ``weights`` plus
    the runtime, whichever is more, plus room for the ``workers`` (threads with a malloc arena each)."""
    return max(resident, weights + RUNTIME_BYTES) + workers * WORKER_BYTES


@dataclass(frozen=True)
class MemoryBudgets:
    """The server-wide budgets a memory limit allows (the pipeline's ``max_*`` settings)."""

    pixels: int
    tokens: int
    result_bytes: int
    request_bytes: int

    @classmethod
    def derive(cls, limit: int, baseline: int, activation_bytes_per_token: int, running_tokens: int) -> MemoryBudgets:
        """Shares of ``limit - baseline``. The tokens' share holds the processor's bytes of every
        token in flight and the model's ``activation_bytes_per_token`` of the ``running_tokens``
        (the lanes' batches running at once; of every token, when the share is too small for that).
        Raises ValueError when the room left is under :data:`SMALLEST_ROOM`."""
        room = limit - baseline
        if room < SMALLEST_ROOM:
            raise ValueError(
                f"the memory limit ({limit / GIB:.2f} GiB) leaves {max(room, 0) / MIB:.0f} MiB beside the model and "
                f"the runtime ({baseline / GIB:.2f} GiB); at least {SMALLEST_ROOM // MIB} MiB are needed"
            )
        share = room * TOKEN_SHARE
        tokens = (share - activation_bytes_per_token * running_tokens) / PROCESSOR_BYTES_PER_TOKEN
        if tokens < running_tokens:  # every token in flight may be running
            tokens = share / (PROCESSOR_BYTES_PER_TOKEN + activation_bytes_per_token)
        return cls(
            pixels=int(room * PIXEL_SHARE / 3),
            tokens=int(tokens),
            result_bytes=int(room * RESULT_SHARE),
            request_bytes=int(room * REQUEST_SHARE),
        )


def activation_bytes_per_token(hidden_size: int, dtype_bytes: int) -> int:
    """The model's live activations per token of a running batch: about 8 x hidden x dtype bytes."""
    return 8 * hidden_size * dtype_bytes
