"""What the benchmarks share: checkpoints, images, alternating rounds, concurrent callers, the
machine's fingerprint, and the JSON result every benchmark writes.

A benchmark is a module ``bench/<area>/<name>.py``, run from the repository root as
``python -m bench.<area>.<name>``. It prints its table and writes it, with the machine (CPU model,
the instruction-set flags that choose kernels, CPUs), the versions, the commit, the date and its
command line, to ``bench/results/<area>-<name>-<machine>.json`` (:meth:`Benchmark.write`);
``python -m bench.render`` turns those files into the docs' tables.
"""

from __future__ import annotations

import qwen25vl_embed_server  # noqa: F401  (first: it sets MKL's dispatch before torch loads)

# isort: split
import argparse
import datetime
import io
import json
import logging
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from qwen25vl_embed import EmbeddingClient
from qwen25vl_embed_server.core.fixtures.tiny_model import BENCH_SHAPE, QWEN25VL_7B_SHAPE, TinyShape, build_tiny_model
from qwen25vl_embed_server.core.model.extractor import Extractor, Prepared

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


# --- checkpoints -------------------------------------------------------------------------------

SHAPES = {"tiny": TinyShape(), "bench": BENCH_SHAPE, "7b": QWEN25VL_7B_SHAPE}
PROMPT = "Describe the image."


def checkpoint(dtype: str | torch.dtype = "float32", *, shape: str = "bench", device: str = "cpu") -> Path:
    """The random-weight checkpoint of ``shape`` (:data:`SHAPES`) in ``dtype``, built once on
    ``device`` and cached under ``~/.cache/qwen25vl-embed``."""
    name = str(dtype).removeprefix("torch.")
    root = Path.home() / ".cache" / "qwen25vl-embed" / f"bench-{shape}-{name}"
    if not (root / "config.json").exists():
        log.info("building the %r random-weight checkpoint in %s ...", shape, root)
        build_tiny_model(root, SHAPES[shape], dtype=getattr(torch, name), device=device)
    return root


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer stopped after it counts it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- images ------------------------------------------------------------------------------------


def noise_image(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """An RGB noise image, its pixels the next ones ``rng`` draws."""
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def noise_images(sizes: Iterable[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    """One noise image per (width, height), in order, all drawn from one generator seeded ``seed``."""
    rng = np.random.default_rng(seed)
    return [noise_image(width, height, rng) for width, height in sizes]


def png(image: Image.Image, *, optimize: bool = False) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=optimize)
    return buffer.getvalue()


def noise_png(width: int, height: int, seed: int) -> bytes:
    """A PNG of a noise image of its own generator (seeded ``seed``): one image per seed."""
    return png(noise_image(width, height, np.random.default_rng(seed)))


# --- alternating rounds ------------------------------------------------------------------------


def alternating(sides: Mapping[K, Callable[[], T]], rounds: int) -> dict[K, list[T]]:
    """Every side's result once per round, the order reversed every other round: drift hits all alike."""
    results: dict[K, list[T]] = {name: [] for name in sides}
    order = list(sides)
    for round_ in range(rounds):
        for name in order if round_ % 2 == 0 else order[::-1]:
            results[name].append(sides[name]())
    return results


def prepared_batches(
    extractors: Mapping[str, Extractor], images: Sequence[Image.Image], outputs: Sequence[str]
) -> dict[str, list[Prepared]]:
    """Each extractor's batch: every image a request of its own, asking for ``outputs``."""
    batches = {}
    for name, extractor in extractors.items():
        plan = extractor.plan(list(outputs))
        batches[name] = [extractor.prepare([image], PROMPT, plan) for image in images]
    return batches


def alternating_ms(
    extractors: Mapping[str, Extractor], batches: Mapping[str, list[Prepared]], rounds: int
) -> dict[str, list[float]]:
    """ms per image of each extractor on its batch, every round (:func:`alternating`)."""

    def timed(name: str) -> Callable[[], float]:
        def run() -> float:
            started = time.perf_counter()
            extractors[name].run(batches[name])
            return (time.perf_counter() - started) / len(batches[name]) * 1e3

        return run

    return alternating({name: timed(name) for name in extractors}, rounds)


def latency_ms(seconds: Sequence[float]) -> tuple[float, float, float]:
    """The median, the 95th percentile (the nearest rank below) and the largest of ``seconds``, in
    ms; NaN where there are none."""
    ordered = sorted(seconds)
    if not ordered:
        return math.nan, math.nan, math.nan
    p95 = ordered[int(0.95 * (len(ordered) - 1))]
    return statistics.median(ordered) * 1000, p95 * 1000, ordered[-1] * 1000


def relative_difference(value: Any, reference: Any) -> float:
    """``max |value - reference| / max |reference|``, in float64."""
    wide = np.asarray(reference, np.float64)
    return float(np.abs(np.asarray(value, np.float64) - wide).max() / np.abs(wide).max())


# --- concurrent callers ------------------------------------------------------------------------


def run_threads(targets: Sequence[Callable[[], None]]) -> float:
    """Each target on a thread of its own, all at once: the seconds until the last one returns."""
    threads = [threading.Thread(target=target) for target in targets]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def concurrently(count: int, callers: int, call: Callable[[int], None]) -> float:
    """``call(index)`` for every index below ``count``, ``callers`` threads taking the next index
    from a common list: the seconds until all are done."""
    lock = threading.Lock()
    indices = iter(range(count))

    def caller() -> None:
        while True:
            with lock:
                index = next(indices, None)
            if index is None:
                return
            call(index)

    return run_threads([caller] * callers)


def wait_until_idle(threshold: float = 0.15, timeout: float = 20.0) -> None:
    """Wait (at most ``timeout`` s) until the machine's CPUs are busy less than ``threshold`` of a
    0.5 s window: what one side left running must not be charged to the other."""

    def busy_idle() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = values[3] + values[4]
        return sum(values) - idle, idle

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy0, idle0 = busy_idle()
        time.sleep(0.5)
        busy1, idle1 = busy_idle()
        if (busy1 - busy0) <= threshold * max(1, (busy1 - busy0) + (idle1 - idle0)):
            return


# --- the service's workloads -------------------------------------------------------------------


@dataclass
class Workload:
    """Image files sent ``per_request`` to a request."""

    name: str
    paths: list[Path]
    per_request: int

    @property
    def requests(self) -> list[list[Path]]:
        return [self.paths[i : i + self.per_request] for i in range(0, len(self.paths), self.per_request)]


def make_workloads(folder: Path) -> list[Workload]:
    """PNGs in ``folder`` (fixed seeds): ``uniform`` 24 images 448x448; ``mixed`` 24 images 256 to
    1536 px on the long side, aspect 1:3 to 3:1; ``two-image`` 12 requests of two 448x448 images."""
    rng = np.random.default_rng(0)

    def save(name: str, width: int, height: int) -> Path:
        path = folder / f"{name}.png"
        noise_image(width, height, rng).save(path)
        return path

    uniform = [save(f"u{i}", 448, 448) for i in range(24)]
    mixed = []
    for i in range(24):
        long_side = int(rng.integers(256, 1537))
        aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
        if aspect >= 1:
            width, height = long_side, max(28, round(long_side / aspect))
        else:
            width, height = max(28, round(long_side * aspect)), long_side
        mixed.append(save(f"m{i}", width, height))
    pairs = [save(f"p{i}", 448, 448) for i in range(24)]
    return [Workload("uniform", uniform, 1), Workload("mixed", mixed, 1), Workload("two-image", pairs, 2)]


def serve_workload(client: EmbeddingClient, workload: Workload, callers: int = 4) -> tuple[float, list[np.ndarray]]:
    """``callers`` threads over one channel: images/s, and each request's ``lm_last_token`` (float64)."""
    requests = [[p.read_bytes() for p in paths] for paths in workload.requests]
    vectors: list[np.ndarray | None] = [None] * len(requests)

    def call(index: int) -> None:
        result = client.extract(requests[index], prompt=PROMPT, outputs=["lm_last_token"])
        vectors[index] = np.asarray(result["lm_last_token"][0], np.float64)

    seconds = concurrently(len(requests), callers, call)
    return len(workload.paths) / seconds, [v for v in vectors if v is not None]


# --- the machine, the versions, the commit -----------------------------------------------------

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def machine(device: str = "cpu") -> dict[str, Any]:
    """The CPU model name, the flags that choose kernels (:data:`CPU_FLAGS`) and the CPU count,
    from ``/proc/cpuinfo`` where it exists; on a CUDA ``device`` also the GPU's name."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.MULTILINE)
    present = set(flags[1].split()) if flags else set()
    found: dict[str, Any] = {
        "model": name[1].strip() if name else platform.processor() or platform.machine(),
        "flags": {flag: flag in present for flag in CPU_FLAGS},
        "cpus": os.cpu_count(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return found


def versions() -> dict[str, str]:
    """Python's, torch's (with its build, e.g. ``+cpu``), transformers' and numpy's versions."""
    try:
        transformers = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        transformers = "absent"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers,
        "numpy": np.__version__,
    }


def commit() -> str:
    """``git rev-parse --short HEAD``, with ``-dirty`` where tracked files differ from it."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return "unknown"
    dirty = git("diff", "--quiet", "HEAD").returncode != 0
    return head.stdout.strip() + ("-dirty" if dirty else "")


def fingerprint(device: str = "cpu") -> dict[str, Any]:
    """The date (UTC), the commit, the machine and the versions: what a result was measured on."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine(device),
        "versions": versions(),
    }


def slug(text: str) -> str:
    """``Intel(R) Xeon(R) Platinum 8480+`` -> ``intel-xeon-platinum-8480``."""
    text = re.sub(r"\((?:r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "cpu"


# --- results -----------------------------------------------------------------------------------


def module_command(module: str, *args: str) -> list[str]:
    """This interpreter running ``module`` with ``args``: run it with ``cwd=ROOT``."""
    return [sys.executable, "-m", module, *args]


def _plain(value: Any) -> Any:
    """``value`` as JSON holds it: numpy scalars as Python's, NaN and infinities as null."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass(frozen=True)
class Benchmark:
    """One benchmark module, ``bench.<area>.<name>``, and what it writes.

    ``doc`` is the module's docstring: its first paragraph is the benchmark's title.
    """

    module: str
    doc: str | None

    @property
    def key(self) -> str:
        """``<area>-<name>``: the start of its result files' names."""
        return "-".join(self.module.split(".")[1:])

    @property
    def title(self) -> str:
        """The docstring's first paragraph, on one line."""
        return " ".join((self.doc or self.module).strip().split("\n\n")[0].split())

    def parser(self, argv: Sequence[str] | None) -> argparse.ArgumentParser:
        """The entry point's parser: the title as description, ``--output``, and the command line
        (``argv``, or the process's) kept as ``args.command``. From here on warnings, and the
        benchmarks' own logs, go to stderr."""
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        logging.getLogger("bench").setLevel(logging.INFO)
        parser = argparse.ArgumentParser(prog=f"python -m {self.module}", description=self.title)
        parser.add_argument(
            "--output", type=Path, help=f"the JSON result (default: bench/results/{self.key}-<machine>.json)"
        )
        arguments = sys.argv[1:] if argv is None else list(argv)
        parser.set_defaults(command=shlex.join(["python", "-m", self.module, *arguments]))
        return parser

    def write(
        self,
        args: argparse.Namespace,
        rows: Sequence[Mapping[str, Any]],
        *,
        summary: Mapping[str, Any] | None = None,
        details: Mapping[str, Any] | None = None,
        device: str = "cpu",
    ) -> Path:
        """Write the result to ``args.output`` or ``bench/results/<area>-<name>-<machine>.json``.

        ``rows`` is the table (a column per key, in the order first seen); ``summary`` figures
        that stand beside it (rendered too); ``details`` whatever else the run knows (not rendered).
        The machine in the file's name is the CPU's model, or on a CUDA ``device`` the GPU's.
        """
        found = fingerprint(device)
        result: dict[str, Any] = {
            "benchmark": self.key,
            "module": self.module,
            "title": self.title,
            "command": args.command,
            **found,
            "rows": list(rows),
        }
        if summary:
            result["summary"] = summary
        if details:
            result["details"] = details
        on = found["machine"].get("gpu") or found["machine"]["model"]
        output: Path = args.output or RESULTS / f"{self.key}-{slug(on)}.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(_plain(result), indent=2) + "\n")
        log.info("wrote %s", output)
        return output
