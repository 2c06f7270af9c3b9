"""Fairness: small requests' latency while one large request runs, whole against in pieces.

In process, no gRPC and no preprocessing in the timed part (every request is prepared first): the
batcher alone decides who waits. Each round submits one large request (``--large-images`` images
of ``--large-side`` pixels square) while ``--clients`` callers send small requests (one 56x56
image, ``lm_last_token``) back to back until the large one is done; rounds alternate
``max_piece_tokens=0`` (whole) and the default piece size, so both see the same machine.

    python -m bench.service.fairness                       # tiny model, 6 x 1344 px, 2 rounds each
    python -m bench.service.fairness --large-side 1792 --rounds 3
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.common import Benchmark, latency_ms, noise_image
from qwen25vl_embed_server.core.fixtures.tiny_model import build_tiny_model
from qwen25vl_embed_server.core.model.extractor import Extractor, Prepared
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model
from qwen25vl_embed_server.core.scheduling.batcher import Batcher, BatchingConfig

BENCH = Benchmark(__spec__.name, __doc__)


async def one_round(
    extractor: Extractor, large: Prepared, small: list[Prepared], clients: int, max_piece_tokens: int
) -> tuple[float, list[float]]:
    """The large request's latency and every small request's, in seconds."""
    batcher = Batcher(extractor, BatchingConfig(max_piece_tokens=max_piece_tokens))
    latencies: list[float] = []
    finished = asyncio.Event()

    async def client(seed: int) -> None:
        i = seed
        while not finished.is_set():
            started = time.monotonic()
            await batcher.submit(small[i % len(small)])
            latencies.append(time.monotonic() - started)
            i += clients

    try:
        callers = [asyncio.ensure_future(client(seed)) for seed in range(clients)]
        await asyncio.sleep(0.2)  # the small traffic is flowing before the large request arrives
        latencies.clear()
        started = time.monotonic()
        await batcher.submit(large)
        large_seconds = time.monotonic() - started
        finished.set()
        await asyncio.gather(*callers)
    finally:
        await batcher.close()
    return large_seconds, latencies


def main(argv: Sequence[str] | None = None) -> int:
    parser = BENCH.parser(argv)
    parser.add_argument("--large-images", type=int, default=6)
    parser.add_argument("--large-side", type=int, default=1344, help="side of each large image, pixels")
    parser.add_argument("--large-outputs", default="projected_pooled_mean", help="comma-separated")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each mode")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        path = build_tiny_model(Path(folder) / "tiny")
        extractor = Extractor(load_model(LoadOptions(model=str(path), device="cpu", dtype="float32")))
    rng = np.random.default_rng(0)
    big = [noise_image(args.large_side, args.large_side, rng) for _ in range(args.large_images)]
    large = extractor.prepare(big, plan=extractor.plan(args.large_outputs.split(",")))
    small = [extractor.prepare([noise_image(56, 56, rng)], plan=extractor.plan(["lm_last_token"])) for _ in range(8)]
    pieces = BatchingConfig().max_piece_tokens
    print(
        f"large request: {args.large_images} x {args.large_side} px, cost {large.cost} tokens, "
        f"{extractor.pieces(large, pieces)} pieces at max_piece_tokens={pieces}; {args.clients} small callers"
    )
    extractor.run([small[0]])  # warm up
    print("| large request | large s | small requests | small p50 ms | small p95 ms | small max ms |")
    print("|---|---|---|---|---|---|")
    rows = []
    for _ in range(args.rounds):
        for mode, setting in (("whole", 0), ("in pieces", pieces)):
            seconds, latency = asyncio.run(one_round(extractor, large, small, args.clients, setting))
            median, p95, top = latency_ms(latency)
            cells = [mode, f"{seconds:.1f}", str(len(latency))] + [f"{v:.0f}" for v in (median, p95, top)]
            print("| " + " | ".join(cells) + " |")
            rows.append(
                {
                    "large request": mode,
                    "large s": seconds,
                    "small requests": len(latency),
                    "small p50 ms": median,
                    "small p95 ms": p95,
                    "small max ms": top,
                }
            )
    details = {"large_cost_tokens": large.cost, "max_piece_tokens": pieces, "clients": args.clients}
    BENCH.write(args, rows, details={**details, "large_images": args.large_images, "large_side": args.large_side})
    return 0


if __name__ == "__main__":
    sys.exit(main())
