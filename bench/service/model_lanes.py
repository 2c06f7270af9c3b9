"""The server with one model lane against two (``--model-lanes``), alternating rounds.

    python -m bench.service.model_lanes                     # fp32 and bf16, uniform and mixed, 1 and 4 callers
    python -m bench.service.model_lanes --dtypes float32 --rounds 12 --workloads uniform --callers 4

Two ``qwen25vl-embed serve`` processes on the 'bench' random-weight checkpoint (see
``bench/common.py``), ``--model-lanes 1`` and ``--model-lanes 2``, both up for the whole run;
each round runs every workload once on each, the one going first alternating, after the machine
went idle. The workloads are ``bench.peers.vs_vllm``'s (24 noise images: uniform 448x448, mixed sizes,
two-image requests), run by ``--callers`` concurrent SDK callers (1: one request at a time, so
images/s there is the inverse of the latency). Prints images/s (median over rounds), the ratio
two / one, the largest difference between the two servers' vectors (0: the same bits; mixed sizes
under load may batch differently, within the batched promise), and in how many rounds two lanes
were faster.
"""

from __future__ import annotations

import qwen25vl_embed_server  # noqa: F401  (first: it sets MKL's dispatch before torch loads)

# isort: split

import statistics
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from bench.common import (
    Benchmark,
    Workload,
    alternating,
    checkpoint,
    make_workloads,
    relative_difference,
    serve_workload,
    wait_until_idle,
)
from qwen25vl_embed import EmbeddingClient
from qwen25vl_embed_server.rpc.harness import ServerProcess

BENCH = Benchmark(__spec__.name, __doc__)
LANES = (1, 2)
Case = tuple[str, int]  # workload, callers


def main(argv: Sequence[str] | None = None) -> None:
    parser = BENCH.parser(argv)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--workloads", nargs="+", default=["uniform", "mixed"])
    parser.add_argument("--callers", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    print("dtype     workload  callers  1 lane img/s  2 lanes img/s  2 / 1   difference  2 faster", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        workloads = [w for w in make_workloads(Path(folder)) if w.name in args.workloads]
        cases = [(workload, callers) for workload in workloads for callers in args.callers]
        for dtype in args.dtypes:
            model = checkpoint(dtype)
            servers = [
                ServerProcess(["--model", str(model), "--device", "cpu", "--dtype", dtype, "--model-lanes", str(n)])
                for n in LANES
            ]
            clients = [EmbeddingClient(server.start().address) for server in servers]
            try:
                for client in clients:  # warm-up
                    serve_workload(client, workloads[0], max(args.callers))

                def every_case(client: EmbeddingClient) -> dict[Case, tuple[float, list[np.ndarray]]]:
                    found = {}
                    for workload, callers in cases:
                        wait_until_idle()
                        found[workload.name, callers] = serve_workload(client, workload, callers)
                    return found

                sides = {n: partial(every_case, client) for n, client in zip(LANES, clients, strict=True)}
                passes = alternating(sides, args.rounds)
            finally:
                for client in clients:
                    client.close()
                for server in servers:
                    server.stop()
            for workload, callers in cases:
                rows.append(compare_lanes(dtype, workload, callers, passes, args.rounds))
    BENCH.write(args, rows, details={"rounds": args.rounds})


def compare_lanes(
    dtype: str,
    workload: Workload,
    callers: int,
    passes: dict[int, list[dict[Case, tuple[float, list[np.ndarray]]]]],
    rounds: int,
) -> dict[str, object]:
    """One case's row (printed too): each lane count's median images/s, the ratio, the largest
    difference between the two servers' vectors (last round), in how many rounds two lanes won."""
    one, two = ([found[workload.name, callers][0] for found in passes[n]] for n in LANES)
    vectors = [passes[n][-1][workload.name, callers][1] for n in LANES]
    difference = max(relative_difference(b, a) for a, b in zip(*vectors, strict=True))
    wins = sum(b > a for a, b in zip(one, two, strict=True))
    one_rate, two_rate = statistics.median(one), statistics.median(two)
    print(
        f"{dtype:9} {workload.name:9} {callers:7} {one_rate:13.2f} {two_rate:14.2f} {two_rate / one_rate:6.3f}x"
        f"  {difference:.1e}  {wins}/{rounds}",
        flush=True,
    )
    return {
        "dtype": dtype,
        "workload": workload.name,
        "callers": callers,
        "1 lane img/s": one_rate,
        "2 lanes img/s": two_rate,
        "2 / 1": two_rate / one_rate,
        "difference": difference,
        "rounds 2 lanes faster": f"{wins}/{rounds}",
    }


if __name__ == "__main__":
    main()
