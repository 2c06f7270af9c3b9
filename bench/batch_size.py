"""ms per image against batch size, the model alone, in alternating rounds: what sets the CPU's
default bound of a batch (``CPU_BATCH_TOKENS`` in ``core/batcher.py``).

    python bench/batch_size.py                         # fp32, 16 noise images 448x448
    python bench/batch_size.py --dtype bfloat16 --fp32-matmul exact --sizes 1 4 16

Each round runs the same 16 prepared images in batches of every size (the order of sizes turns
round by round) for ``lm_last_token`` and for a vision-only output, and prints the median ms per
image, its ratio to the best size, and each batch's cost in tokens.
"""

from __future__ import annotations

import qwen25vl_embed_server  # noqa: F401  (first: it sets MKL's dispatch before torch loads)

# isort: split

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # run as a script: bench/ modules import each other
from throughput import PROMPT, checkpoint

from qwen25vl_embed_server.core.defaults import FP32_MATMULS
from qwen25vl_embed_server.core.extractor import Extractor
from qwen25vl_embed_server.core.loading import LoadOptions, load_model

OUTPUTS = {"with the LM": "lm_last_token", "vision only": "vision_pooled_mean"}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--fp32-matmul", default="onednn", choices=FP32_MATMULS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    path = str(checkpoint("bench", "cpu", getattr(torch, args.dtype)))
    options = LoadOptions(model=path, device="cpu", dtype=args.dtype, fp32_matmul=args.fp32_matmul)
    extractor = Extractor(load_model(options))
    rng = np.random.default_rng(0)
    count = max(args.sizes)
    images = [Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)) for _ in range(count)]
    print(f"{args.dtype}, fp32 matmul {args.fp32_matmul}, {count} images 448x448, the model alone")
    for label, output in OUTPUTS.items():
        prepared = [extractor.prepare([image], PROMPT, extractor.plan([output])) for image in images]
        extractor.run(prepared[:4])  # warm-up
        times: dict[int, list[float]] = {size: [] for size in args.sizes}
        for round_ in range(args.rounds):
            for size in args.sizes if round_ % 2 == 0 else list(reversed(args.sizes)):
                started = time.perf_counter()
                for start in range(0, count, size):
                    extractor.run(prepared[start : start + size])
                times[size].append((time.perf_counter() - started) / count * 1e3)
        best = min(statistics.median(values) for values in times.values())
        for size, values in times.items():
            median = statistics.median(values)
            tokens = size * prepared[0].cost
            ratio = median / best
            print(f"{label:12} batch {size:3} ({tokens:6} tokens) {median:7.1f} ms/image  x{ratio:.2f} of the best")


if __name__ == "__main__":
    main()
