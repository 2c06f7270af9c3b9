"""ms per image against batch size, the model alone, in alternating rounds: what sets the CPU's
default bound of a batch (``CPU_BATCH_TOKENS`` in ``core/scheduling/batcher.py``).

    python -m bench.service.batch_size                         # fp32, 16 noise images 448x448
    python -m bench.service.batch_size --dtype bfloat16 --fp32-matmul exact --sizes 1 4 16

Each round runs the same 16 prepared images in batches of every size (the order of sizes turns
round by round) for ``lm_last_token`` and for a vision-only output, and prints the median ms per
image, its ratio to the best size, and each batch's cost in tokens.
"""

from __future__ import annotations

import qwen25vl_embed_server  # noqa: F401  (first: it sets MKL's dispatch before torch loads)

# isort: split

import statistics
import time
from collections.abc import Callable, Sequence

from bench.common import PROMPT, Benchmark, alternating, checkpoint, noise_images
from qwen25vl_embed_server.core.defaults import FP32_MATMULS
from qwen25vl_embed_server.core.model.extractor import Extractor, Prepared
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model

BENCH = Benchmark(__spec__.name, __doc__)
OUTPUTS = {"with the LM": "lm_last_token", "vision only": "vision_pooled_mean"}


def main(argv: Sequence[str] | None = None) -> None:
    parser = BENCH.parser(argv)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--fp32-matmul", default="onednn", choices=FP32_MATMULS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    path = str(checkpoint(args.dtype))
    options = LoadOptions(model=path, device="cpu", dtype=args.dtype, fp32_matmul=args.fp32_matmul)
    extractor = Extractor(load_model(options))
    count: int = max(args.sizes)
    images = noise_images([(448, 448)] * count)
    print(f"{args.dtype}, fp32 matmul {args.fp32_matmul}, {count} images 448x448, the model alone")
    rows = []
    for label, output in OUTPUTS.items():
        prepared = [extractor.prepare([image], PROMPT, extractor.plan([output])) for image in images]
        extractor.run(prepared[:4])  # warm-up

        def in_batches(size: int, prepared: list[Prepared] = prepared) -> Callable[[], float]:
            """ms per image of every image run in batches of ``size``."""

            def run() -> float:
                started = time.perf_counter()
                for start in range(0, count, size):
                    extractor.run(prepared[start : start + size])
                return (time.perf_counter() - started) / count * 1e3

            return run

        times = alternating({size: in_batches(size) for size in args.sizes}, args.rounds)
        best = min(statistics.median(values) for values in times.values())
        for size, values in times.items():
            median = statistics.median(values)
            tokens = size * prepared[0].cost
            ratio = median / best
            print(f"{label:12} batch {size:3} ({tokens:6} tokens) {median:7.1f} ms/image  x{ratio:.2f} of the best")
            rows.append({"outputs": label, "batch": size, "tokens": tokens, "ms/image": median, "x the best": ratio})
    BENCH.write(args, rows)


if __name__ == "__main__":
    main()
