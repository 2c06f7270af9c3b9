"""MKL choosing its kernels by CPU features against MKL's own choice, the model alone.

    python -m bench.cpu.mkl_dispatch                   # fp32 exact, fp32 onednn, bf16; 3 rounds
    python -m bench.cpu.mkl_dispatch --variants float32 --rounds 5

``core/cpu/mkl_dispatch.py`` is a state of the whole process, set before torch loads, so each
measurement is a fresh process of this module (``--measure``) with ``QWEN25VL_EMBED_MKL_DISPATCH``
set to ``features`` (what the package does) or ``vendor`` (MKL's own choice), in alternating order.
Each process times torch's fp32 linear at the 'bench' language model's MLP shape (GFLOP/s) and the
model on a batch of four noise images 448x448 with the prompt, ``lm_last_token`` (ms per image,
the median of 5 runs after a warm-up). Prints the medians over rounds, the ratio, and the largest
difference between the two dispatches' vectors relative to the largest vector entry (float
rounding in fp32; 0 in bf16, whose matmuls are oneDNN's either way).
"""

from __future__ import annotations

import qwen25vl_embed_server  # noqa: F401  (first: it sets MKL's dispatch before torch loads)

# isort: split
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    PROMPT,
    ROOT,
    Benchmark,
    alternating,
    checkpoint,
    module_command,
    noise_images,
    relative_difference,
)
from qwen25vl_embed_server.core.cpu import mkl_dispatch
from qwen25vl_embed_server.core.fixtures.tiny_model import BENCH_SHAPE
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model

BENCH = Benchmark(__spec__.name, __doc__)
# name: (dtype, fp32 matmul)
VARIANTS = {"float32": ("float32", "exact"), "float32-onednn": ("float32", "onednn"), "bfloat16": ("bfloat16", "exact")}
DISPATCHES = ("features", "vendor")


def linear_gflops(rows: int = 1336) -> float:
    """torch's fp32 linear at the 'bench' LM's gate projection: ``rows`` tokens (4 images)."""
    weight = torch.randn(BENCH_SHAPE.text_intermediate, BENCH_SHAPE.text_hidden)
    inputs = torch.randn(rows, BENCH_SHAPE.text_hidden)
    for _ in range(5):
        torch.nn.functional.linear(inputs, weight)
    runs = 50
    started = time.perf_counter()
    for _ in range(runs):
        torch.nn.functional.linear(inputs, weight)
    seconds = (time.perf_counter() - started) / runs
    return 2 * rows * weight.shape[0] * weight.shape[1] / seconds / 1e9


def measure(variant: str, vectors: Path) -> dict[str, float | str]:
    """This process's figures; the vectors of the last run go to ``vectors`` (.npy)."""
    dtype, fp32_matmul = VARIANTS[variant]
    path = str(checkpoint(dtype))
    extractor = Extractor(load_model(LoadOptions(model=path, device="cpu", dtype=dtype, fp32_matmul=fp32_matmul)))
    images = noise_images([(448, 448)] * 4)
    plan = extractor.plan(["lm_last_token"])
    prepared = [extractor.prepare([image], PROMPT, plan) for image in images]
    extractor.run(prepared)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        results = extractor.run(prepared)
        times.append((time.perf_counter() - started) / len(prepared) * 1e3)
    np.save(vectors, np.stack([result.tensors["lm_last_token"].astype(np.float64) for result in results]))
    state = mkl_dispatch.state()
    return {"ms": statistics.median(times), "gflops": linear_gflops(), "applied": str(state.applied)}


def in_child(variant: str, dispatch: str, vectors: Path) -> dict[str, float | str]:
    """:func:`measure` in a fresh process with MKL's dispatch ``dispatch``."""
    environment = {**os.environ, mkl_dispatch.ENV: dispatch}
    command = module_command(__spec__.name, "--measure", variant, str(vectors))
    run = subprocess.run(command, check=True, capture_output=True, text=True, env=environment, cwd=ROOT)
    figures: dict[str, float | str] = json.loads(run.stdout.splitlines()[-1])
    return figures


def main(argv: Sequence[str] | None = None) -> None:
    parser = BENCH.parser(argv)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--measure", nargs=2, metavar=("VARIANT", "VECTORS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for variant in args.variants:
            checkpoint(VARIANTS[variant][0])  # built before the timed processes
            sides = {name: partial(in_child, variant, name, Path(work) / f"{name}.npy") for name in DISPATCHES}
            figures = alternating(sides, args.rounds)
            features, vendor = (np.load(Path(work) / f"{name}.npy") for name in DISPATCHES)
            difference = relative_difference(features, vendor)
            base = statistics.median(float(figure["ms"]) for figure in figures["vendor"])
            for name, values in figures.items():
                ms = statistics.median(float(figure["ms"]) for figure in values)
                gflops = statistics.median(float(figure["gflops"]) for figure in values)
                rounds = [float(figure["ms"]) for figure in values]
                print(
                    f"{variant:14} {name:8} (applied: {values[0]['applied']:5}) {ms:7.1f} ms/image  "
                    f"x{base / ms:.2f}  linear {gflops:5.0f} GFLOP/s  rounds {', '.join(f'{r:.1f}' for r in rounds)}"
                )
                rows.append(
                    {
                        "variant": variant,
                        "dispatch": name,
                        "applied": values[0]["applied"],
                        "ms/image": ms,
                        "vs vendor": base / ms,
                        "linear GFLOP/s": gflops,
                        "rel. difference features vs vendor": difference,
                        "rounds ms": rounds,
                    }
                )
            print(f"{variant:14} largest difference of lm_last_token, features vs vendor: {difference:.2e}")
    BENCH.write(args, rows, details={"rounds": args.rounds})


if __name__ == "__main__":
    main()
