"""A burst that cannot all finish in time: concurrent large images with a deadline, each answered or refused at once.

A fresh ``serve`` process (tiny model, loopback; it measures a few smaller sizes as it starts, see
``--calibration-seconds``) gets ``--requests`` callers sending at once one PNG that decodes to
``--side`` x ``--side`` pixels (a small file: one colour) with a ``--deadline``, without retries:
no request of the burst's size ran before (``--prime``: one runs first, so that its cost is
measured). For each it records the outcome (OK, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED) and how long
the answer took: the server should answer those it can finish in time and refuse the others within
moments. It fails when any request ran out of time, or a refusal took over ``--refuse-within``.

    python -m bench.overload.deadline_burst                     # 30 x 3584 x 3584, 150 s deadline
    python -m bench.overload.deadline_burst --requests 10 --side 1792 --deadline 20
    python -m bench.overload.deadline_burst --prime             # that size measured first
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench.common import Benchmark
from bench.overload.soak import solid_png
from qwen25vl_embed import EmbeddingClient, EmbeddingError
from qwen25vl_embed_server.core.fixtures.tiny_model import build_tiny_model
from qwen25vl_embed_server.rpc.harness import ServerProcess

BENCH = Benchmark(__spec__.name, __doc__)
OUTPUTS = ["lm_last_token"]


class ServerLog:
    """The server's log lines, kept."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> None:
        self.lines.append(text)


def burst(
    address: str, image: bytes, requests: int, deadline: float, prime: bool
) -> tuple[float | None, list[tuple[str, float]]]:
    """With ``prime``, one request alone first (its seconds); then ``requests`` at once: each one's
    outcome and seconds."""
    answers: list[tuple[str, float]] = []
    lock = threading.Lock()
    alone = None
    with EmbeddingClient(address, timeout=3600, retry=None) as client:
        if prime:
            started = time.monotonic()
            client.extract(image, outputs=OUTPUTS)
            alone = time.monotonic() - started

        def caller() -> None:
            sent = time.monotonic()
            try:
                client.extract(image, outputs=OUTPUTS, timeout=deadline)
                outcome = "OK"
            except EmbeddingError as error:
                outcome = error.code.name
            with lock:
                answers.append((outcome, time.monotonic() - sent))

        threads = [threading.Thread(target=caller) for _ in range(requests)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return alone, answers


def main(argv: Sequence[str] | None = None) -> int:
    parser = BENCH.parser(argv)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--side", type=int, default=3584)
    parser.add_argument("--deadline", type=float, default=150.0)
    parser.add_argument("--prime", action="store_true", help="run one request of the burst's size first")
    parser.add_argument("--refuse-within", type=float, default=2.0, help="seconds a refusal may take")
    args = parser.parse_args(argv)
    image = solid_png(args.side)
    with tempfile.TemporaryDirectory() as folder:
        model = build_tiny_model(Path(folder) / "tiny")
        log = ServerLog()
        with ServerProcess(["--model", str(model)], echo=log) as server:
            alone, answers = burst(server.address, image, args.requests, args.deadline, args.prime)
    counts = Counter(outcome for outcome, _ in answers)
    rows = []
    for outcome in sorted(counts):
        seconds = sorted(took for kind, took in answers if kind == outcome)
        rows.append(
            {
                "outcome": outcome,
                "count": counts[outcome],
                "fastest s": round(seconds[0], 2),
                "slowest s": round(seconds[-1], 2),
            }
        )
    calibrated = [line.strip() for line in log.lines if "calibrated" in line]
    print("\n".join(calibrated))
    primed = "a fresh server" if alone is None else f"after one request alone ({alone:.1f} s)"
    print(f"{primed}: {args.requests} at once, deadline {args.deadline:g} s:")
    for row in rows:
        print("  " + "  ".join(f"{key}: {value}" for key, value in row.items()))
    slowest_refusal = max((took for kind, took in answers if kind == "RESOURCE_EXHAUSTED"), default=0.0)
    summary = {
        "one alone s": alone,
        "deadline exceeded": counts["DEADLINE_EXCEEDED"],
        "slowest refusal s": slowest_refusal,
    }
    BENCH.write(args, rows, summary=summary, details={"answers": answers, "calibration": calibrated})
    return 0 if "DEADLINE_EXCEEDED" not in counts and slowest_refusal <= args.refuse_within else 1


if __name__ == "__main__":
    sys.exit(main())
