"""The server with one model lane against two (``--model-lanes``), alternating rounds.

    python bench/model_lanes.py                                # fp32 and bf16, uniform and mixed, 1 and 4 callers
    python bench/model_lanes.py --dtypes float32 --rounds 12 --workloads uniform --callers 4

Two ``qwen25vl-embed serve`` processes on the 'bench' random-weight checkpoint (see
``bench/throughput.py``), ``--model-lanes 1`` and ``--model-lanes 2``, both up for the whole run;
each round runs every workload once on each, the one going first alternating, after the machine
went idle. The workloads are ``bench/vs_vllm.py``'s (24 noise images: uniform 448x448, mixed sizes,
two-image requests), run by ``--callers`` concurrent SDK callers (1: one request at a time, so
images/s there is the inverse of the latency). Prints images/s (median over rounds), the ratio
two / one, the largest difference between the two servers' vectors (0: the same bits; mixed sizes
under load may batch differently, within the batched promise), and in how many rounds two lanes
were faster.
"""

from __future__ import annotations

import qwen25vl_embed_server  # noqa: F401  (first: it sets MKL's dispatch before torch loads)

# isort: split

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # run as a script: bench/ modules import each other
from throughput import checkpoint
from vs_vllm import make_workloads, ours, relative_difference, wait_until_idle

from qwen25vl_embed import EmbeddingClient
from qwen25vl_embed_server.rpc.harness import ServerProcess

LANES = (1, 2)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--workloads", nargs="+", default=["uniform", "mixed"])
    parser.add_argument("--callers", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    print("dtype     workload  callers  1 lane img/s  2 lanes img/s  2 / 1   difference  2 faster", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        workloads = [w for w in make_workloads(Path(folder)) if w.name in args.workloads]
        for dtype in args.dtypes:
            model = checkpoint("bench", "cpu", getattr(torch, dtype))
            servers = [
                ServerProcess(["--model", str(model), "--device", "cpu", "--dtype", dtype, "--model-lanes", str(n)])
                for n in LANES
            ]
            clients = [EmbeddingClient(server.start().address) for server in servers]
            try:
                cases = [(workload, callers) for workload in workloads for callers in args.callers]
                rates: dict[tuple[str, int, int], list[float]] = {}
                vectors = {}
                for client in clients:  # warm-up
                    ours(client, workloads[0], max(args.callers))
                for round_ in range(args.rounds):
                    order = range(len(LANES)) if round_ % 2 == 0 else reversed(range(len(LANES)))
                    for index in order:
                        for workload, callers in cases:
                            wait_until_idle()
                            rate, vectors[workload.name, callers, index] = ours(clients[index], workload, callers)
                            rates.setdefault((workload.name, callers, index), []).append(rate)
                for workload, callers in cases:
                    one, two = (statistics.median(rates[workload.name, callers, i]) for i in range(len(LANES)))
                    pair = [vectors[workload.name, callers, i] for i in range(len(LANES))]
                    difference = relative_difference(pair[1], pair[0])
                    wins = sum(
                        b > a for a, b in zip(*(rates[workload.name, callers, i] for i in range(2)), strict=True)
                    )
                    print(
                        f"{dtype:9} {workload.name:9} {callers:7} {one:13.2f} {two:14.2f} {two / one:6.3f}x"
                        f"  {difference:.1e}  {wins}/{args.rounds}",
                        flush=True,
                    )
            finally:
                for client in clients:
                    client.close()
                for server in servers:
                    server.stop()


if __name__ == "__main__":
    main()
