"""bf16 in float32 arithmetic against torch's bf16 kernels, the model alone, alternating rounds.

    python bench/bf16_arithmetic.py                  # 4 images 448x448, then 4 of mixed sizes
    python bench/bf16_arithmetic.py --sizes mixed --rounds 6
    python bench/bf16_arithmetic.py --vision-only    # the vision tower alone

The 'bench' random-weight checkpoint (its float32 weights) loaded three times on the CPU, as the
server loads it: ``bf16 native`` (``--bf16-arithmetic native``: torch's bf16 kernels, oneDNN-packed),
``bf16 float32`` (``--bf16-arithmetic float32``, ``core/bf16_arithmetic.py``) and ``fp32`` (the
default dtype, for reference). Each round runs the batch once on each, the order alternating.
Prints ms per image (median over rounds), each one's speed over ``bf16 native``, and each bf16
variant's largest error against fp32, relative to the capture point's largest magnitude: the two
must be of one size (bf16 rounding), or the faster arithmetic would cost accuracy.
"""

from __future__ import annotations

import qwen25vl_embed_server  # noqa: F401  (first: it sets MKL's dispatch before torch loads)

# isort: split

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # run as a script: bench/ modules import each other
from exact_forwards import OUTPUTS, SIZES, alternating_ms
from throughput import PROMPT, checkpoint

from qwen25vl_embed_server.core.bf16_arithmetic import cpu_has_bf16_dot_products
from qwen25vl_embed_server.core.extractor import Extractor
from qwen25vl_embed_server.core.loading import LoadOptions, load_model

VARIANTS = {"bf16 native": ("bfloat16", "native"), "bf16 float32": ("bfloat16", "float32"), "fp32": ("float32", "auto")}


def relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    wide = reference.astype(np.float64)
    return float(np.abs(value.astype(np.float64) - wide).max() / np.abs(wide).max())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--vision-only", action="store_true", help="the vision tower alone (no LM output asked)")
    args = parser.parse_args(argv)
    path = str(checkpoint("bench", "cpu", torch.float32))
    extractors = {
        name: Extractor(load_model(LoadOptions(model=path, device="cpu", dtype=dtype, bf16_arithmetic=arithmetic)))
        for name, (dtype, arithmetic) in VARIANTS.items()
    }
    outputs = OUTPUTS[:2] if args.vision_only else OUTPUTS
    print(f"{torch.get_num_threads()} threads; bf16 dot products in hardware: {cpu_has_bf16_dot_products()}")
    rng = np.random.default_rng(0)
    for sizes in args.sizes:
        images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES[sizes]]
        plans = {name: e.plan(outputs) for name, e in extractors.items()}
        batches = {name: [e.prepare([i], PROMPT, plans[name]) for i in images] for name, e in extractors.items()}
        results = {name: e.run(batches[name]) for name, e in extractors.items()}  # also the warm-up
        times = alternating_ms(extractors, batches, args.rounds)
        base = statistics.median(times["bf16 native"])
        for name, values in times.items():
            ms = statistics.median(values)
            print(f"{sizes:8} {name:13} {ms:7.1f} ms/image  x{base / ms:4.2f}", flush=True)
        for name in ("bf16 native", "bf16 float32"):
            errors = {
                key: max(
                    relative_error(ours.tensors[key], exact.tensors[key])
                    for ours, exact in zip(results[name], results["fp32"], strict=True)
                )
                for key in outputs
            }
            shown = "  ".join(f"{key} {error:.1e}" for key, error in errors.items())
            print(f"{sizes:8} {name:13} error vs fp32: {shown}", flush=True)


if __name__ == "__main__":
    main()
