"""Preprocessing on the CPU: decode + processor per image, and how it scales with workers.

    python -m bench.service.preprocess                     # 448x448 PNGs, 1 / 2 / 4 workers
    python -m bench.service.preprocess --size 1024 --images 32

The server decodes and preprocesses each request on a pool of threads (``--preprocess-workers``)
beside the model thread. Decoding (Pillow, libpng / libjpeg) and the processor's torch ops
(transformers' torchvision backend; each worker runs them on itself alone, as the server's do)
release the GIL, the tokenizer and the Python around them do not. This measures the same chain
the server runs (:func:`~qwen25vl_embed_server.core.admission.request.prepare_request`: check, decode,
chat template, processor) on threads and, for comparison, on processes, in alternating rounds.
First it compares transformers' two image processors for the checkpoint on the same decoded
images, in alternating rounds: the torchvision backend (transformers 5's default, which the server
and the tests' references use) and the PIL one: ms per image and the largest difference in
pixel values (float rounding without a resize; the resize kernels differ).
"""

from __future__ import annotations

import qwen25vl_embed_server  # noqa: F401  (first: it sets MKL's dispatch before torch loads)

# isort: split

import copy
import io
import multiprocessing
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial

import numpy as np
from PIL import Image

from bench.common import PROMPT, Benchmark, alternating, checkpoint, noise_image, png
from qwen25vl_embed_server.core.admission.limits import Limits
from qwen25vl_embed_server.core.admission.request import EncodedRequest, prepare_request
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model
from qwen25vl_embed_server.core.scheduling.model_thread import single_threaded_torch

BENCH = Benchmark(__spec__.name, __doc__)
_EXTRACTOR: list[Extractor] = []  # one per process, loaded by the first worker started in it
_LOCAL = threading.local()  # each worker thread's own processor, as in the server


def _start(model: str) -> None:
    """Each worker (thread or process) gets a processor of its own and runs torch on itself alone,
    as the server's workers do."""
    single_threaded_torch()
    if not _EXTRACTOR:
        _EXTRACTOR.append(Extractor(load_model(LoadOptions(model=model, device="cpu", dtype="float32"))))
    _LOCAL.processor = copy.deepcopy(_EXTRACTOR[0].loaded.processor)


def _prepare(data: bytes) -> int:
    """Check, decode, template, processor: the server's preprocessing of one request; its patches."""
    extractor = _EXTRACTOR[0]
    request = EncodedRequest(images=(data,), prompt=PROMPT, outputs=("lm_last_token",))
    plan = extractor.plan_request(request)
    return prepare_request(extractor, request, Limits(), plan, _LOCAL.processor).num_patches


def rate(executor: Executor, images: Sequence[bytes]) -> float:
    started = time.perf_counter()
    list(executor.map(_prepare, images))
    return len(images) / (time.perf_counter() - started)


def compare_backends(model: str, images: Sequence[Image.Image], rounds: int) -> dict[str, float]:
    """transformers' torchvision and PIL image processors: ms per image of each (printed too), and
    the largest difference of their pixel values."""
    from transformers import AutoImageProcessor

    processors = {
        backend: AutoImageProcessor.from_pretrained(model, backend=backend)  # type: ignore[no-untyped-call]
        for backend in ("torchvision", "pil")
    }
    outputs = {
        name: [p(images=[image], return_tensors="pt")["pixel_values"] for image in images]
        for name, p in processors.items()
    }
    largest = max(float((a - b).abs().max()) for a, b in zip(outputs["torchvision"], outputs["pil"], strict=True))

    def timed(name: str) -> float:
        started = time.perf_counter()
        for image in images:
            processors[name](images=[image], return_tensors="pt")
        return (time.perf_counter() - started) / len(images) * 1e3

    times = alternating({name: partial(timed, name) for name in processors}, rounds)
    figures = {}
    for name, values in times.items():
        figures[f"image processor, {name} backend, ms/image"] = statistics.median(values)
        print(f"image processor, {name:11} backend: {statistics.median(values):6.2f} ms per image")
    print(f"  largest difference of their pixel values: {largest:.3g}")
    figures["largest difference of their pixel values"] = largest
    return figures


def main(argv: Sequence[str] | None = None) -> None:
    parser = BENCH.parser(argv)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    model = str(checkpoint())
    rng = np.random.default_rng(0)
    images = [png(noise_image(args.size, args.size, rng)) for _ in range(args.images)]

    _start(model)
    started = time.perf_counter()
    for data in images:
        _prepare(data)
    one_thread = (time.perf_counter() - started) / len(images) * 1e3
    print(f"one thread: {one_thread:.1f} ms per {args.size}x{args.size} image")
    summary = {"one thread, ms/image": one_thread}

    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in images[:16]]
    summary |= compare_backends(model, decoded, args.rounds)

    pools: dict[str, Callable[[int], Executor]] = {
        "threads": lambda n: ThreadPoolExecutor(n, initializer=_start, initargs=(model,)),
        # spawn, not fork: a forked torch (its OpenMP pool started) can deadlock in the child.
        "processes": lambda n: ProcessPoolExecutor(
            n, mp_context=multiprocessing.get_context("spawn"), initializer=_start, initargs=(model,)
        ),
    }
    executors = {(kind, n): make(n) for kind, make in pools.items() for n in args.workers}
    try:
        for executor in executors.values():  # warm: every worker started and loaded
            rate(executor, images[: 2 * max(args.workers)])
        rates = alternating({key: partial(rate, executor, images) for key, executor in executors.items()}, args.rounds)
    finally:
        for executor in executors.values():
            executor.shutdown()
    print(f"{os.cpu_count()} CPUs; images/s (median of {args.rounds} alternating rounds):")
    rows = []
    for (kind, n), values in rates.items():
        print(f"  {kind:9} x{n}: {statistics.median(values):7.1f}")
        rows.append({"workers": kind, "count": n, "images/s": statistics.median(values)})
    BENCH.write(args, rows, summary=summary, details={"size": args.size, "images": args.images})


if __name__ == "__main__":
    main()
