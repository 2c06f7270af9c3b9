"""All torch work on the model thread against a second thread that runs torch ops too, the model alone.

    python -m bench.service.model_thread                  # fp32 and bf16, one noise image 448x448 per run
    python -m bench.service.model_thread --dtypes bfloat16 --rounds 5

libgomp's throttling (see ``core/scheduling/model_thread.py``) is a state of the whole process, so each
measurement is a fresh process of this module (``--measure``), the variants in alternating order.
Variants: ``one thread`` (the model loads on its thread; requests are prepared on a preprocessing
thread that calls ``single_threaded_torch``: what ``serve`` does) and ``two teams`` (the same, with
the preprocessing thread's torch ops left on torch's full thread count).
Prints ms per image (median over rounds) and the ratio.
"""

from __future__ import annotations

import qwen25vl_embed_server  # noqa: F401  (first: it sets MKL's dispatch before torch loads)

# isort: split

import argparse
import statistics
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from bench.common import PROMPT, ROOT, Benchmark, alternating, checkpoint, module_command, noise_images
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model
from qwen25vl_embed_server.core.scheduling.model_thread import single_threaded_torch

BENCH = Benchmark(__spec__.name, __doc__)
VARIANTS = {"one thread": True, "two teams": False}


def measure(dtype: str, capped: bool, runs: int = 16) -> float:
    """ms per image of ``runs`` single-image runs, after a warm-up, in this process."""
    model_thread = ThreadPoolExecutor(1)
    preprocessing = ThreadPoolExecutor(1, initializer=single_threaded_torch if capped else None)
    path = str(checkpoint(dtype))
    extractor = model_thread.submit(lambda: Extractor(load_model(LoadOptions(model=path, device="cpu", dtype=dtype))))
    ready = extractor.result()
    images = noise_images([(448, 448)] * 4)
    plan = ready.plan(["lm_last_token"])
    prepared = [preprocessing.submit(ready.prepare, [image], PROMPT, plan).result() for image in images]
    for item in prepared[:2]:
        model_thread.submit(ready.run, [item]).result()
    started = time.perf_counter()
    for index in range(runs):
        model_thread.submit(ready.run, [prepared[index % len(prepared)]]).result()
    return (time.perf_counter() - started) / runs * 1e3


def in_child(dtype: str, variant: str) -> float:
    """:func:`measure` in a fresh process."""
    command = module_command(__spec__.name, "--measure", dtype, variant)
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return float(output.split()[-1])


def main(argv: Sequence[str] | None = None) -> None:
    parser = BENCH.parser(argv)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--measure", nargs=2, metavar=("DTYPE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        dtype, variant = args.measure
        print(f"{measure(dtype, VARIANTS[variant]):.3f}")
        return
    rows = []
    for dtype in args.dtypes:
        checkpoint(dtype)  # built once, before the timed processes
        times = alternating({name: partial(in_child, dtype, name) for name in VARIANTS}, args.rounds)
        base = statistics.median(times["two teams"])
        for name, values in times.items():
            median = statistics.median(values)
            rounds = ", ".join(f"{value:.1f}" for value in values)
            print(f"{dtype:9} {name:10} {median:7.1f} ms/image  x{base / median:.2f}  rounds {rounds}")
            rows.append(
                {
                    "dtype": dtype,
                    "variant": name,
                    "ms/image": median,
                    "vs two teams": base / median,
                    "rounds ms": values,
                }
            )
    BENCH.write(args, rows)


if __name__ == "__main__":
    main()
