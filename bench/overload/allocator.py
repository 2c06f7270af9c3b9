"""Malloc settings under a memory limit: peak RSS and throughput of ``serve`` with each setting, alternating rounds.

Each round starts a ``serve`` process (tiny model, ``--memory-limit``) per setting, in turn, and
runs the same load on it for ``--seconds``: ``--callers`` closed-loop callers of good requests
(448 to 1344 pixels a side) beside the hostile mix of ``bench.overload.soak`` (decompression bombs,
images at the pixel limit, ExtractBatch streams of heavy outputs that never read, cancelled
calls). It records good requests per second and the peak RSS over the warmed-up baseline. The
settings:

  system    glibc's defaults (``serve --malloc system``)
  arenas    glibc's, with at most 2 arenas (``MALLOC_ARENA_MAX=2``)
  mmap4m    glibc's, with buffers of 4 MiB or more mapped on their own (``MALLOC_MMAP_THRESHOLD_``)
  tuned     what ``serve`` applies under a memory limit (``--malloc tuned``: 2 arenas, and freed
            memory given back after a large request)

    python -m bench.overload.allocator                       # 3 rounds of 45 s each
    python -m bench.overload.allocator --rounds 1 --seconds 20 --settings system,tuned
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import Benchmark
from bench.overload.soak import ATTACKERS, Mix, run, status_kib
from qwen25vl_embed_server.core.fixtures.tiny_model import build_tiny_model
from qwen25vl_embed_server.rpc.harness import ServerProcess

BENCH = Benchmark(__spec__.name, __doc__)
SETTINGS: dict[str, tuple[list[str], dict[str, str]]] = {
    "system": (["--malloc", "system"], {}),
    "arenas": (["--malloc", "system"], {"MALLOC_ARENA_MAX": "2"}),
    "mmap4m": (["--malloc", "system"], {"MALLOC_MMAP_THRESHOLD_": str(4 << 20)}),
    "tuned": (["--malloc", "tuned"], {}),
}


def one_round(model: Path, setting: str, seconds: float, callers: int, limit: str) -> tuple[float, float, float]:
    """Good requests per second, peak RSS over the baseline and peak RSS (MiB) of one run."""
    flags, env = SETTINGS[setting]
    serve = ["--model", str(model), "--memory-limit", limit, "--send-timeout", "5", *flags]
    with ServerProcess(serve, echo=None, env=env) as server:
        assert server.process is not None
        pid = server.process.pid
        mix = Mix(server.address, pid, time.monotonic())  # warms up: every good image once
        baseline = status_kib(pid, "VmRSS") / 1024
        mix.until = time.monotonic() + seconds
        mix.latency.clear()
        threads = [threading.Thread(target=mix.closed_loop, args=(seed,)) for seed in range(callers)]
        threads += [threading.Thread(target=mix.attacker, args=(kind,)) for kind in ATTACKERS]
        run(threads)
        peak = status_kib(pid, "VmHWM") / 1024
        if mix.wrong:
            raise AssertionError(f"{setting}: {mix.wrong} wrong results")
    return len(mix.latency) / seconds, peak - baseline, peak


def main(argv: Sequence[str] | None = None) -> int:
    parser = BENCH.parser(argv)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=45)
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument("--memory-limit", default="2G")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated ({','.join(SETTINGS)})")
    args = parser.parse_args(argv)
    chosen = [name for name in args.settings.split(",") if name]
    if unknown := sorted(set(chosen) - set(SETTINGS)):
        parser.error(f"unknown setting(s): {', '.join(unknown)}")
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in chosen}
    with tempfile.TemporaryDirectory() as folder:
        model = build_tiny_model(Path(folder) / "tiny")
        for index in range(args.rounds):
            for name in chosen if index % 2 == 0 else chosen[::-1]:
                result = one_round(model, name, args.seconds, args.callers, args.memory_limit)
                results[name].append(result)
                print(f"round {index + 1} {name}: {result[0]:.2f} good/s, peak {result[2]:.0f} MiB (+{result[1]:.0f})")
    base = statistics.median(rate for rate, _, _ in results[chosen[0]])
    rows = []
    for name, runs in results.items():
        rate = statistics.median(r for r, _, _ in runs)
        rows.append(
            {
                "setting": name,
                "good requests/s (median)": round(rate, 3),
                f"vs {chosen[0]}": round(rate / base, 3) if base else float("nan"),
                "peak RSS over baseline MiB (max)": round(max(over for _, over, _ in runs)),
                "peak RSS MiB (max)": round(max(peak for _, _, peak in runs)),
            }
        )
    for row in rows:
        print("  ".join(f"{key}: {value}" for key, value in row.items()))
    BENCH.write(args, rows, details={"runs": results, "settings": chosen})
    return 0


if __name__ == "__main__":
    sys.exit(main())
