"""jina-embeddings-v4's tasks in one batch: each row its task's LoRA in one forward, or one forward per task.

    python -m bench.retrieval.jina_tasks                     # 'bench' shape, texts and images
    python -m bench.retrieval.jina_tasks --shape tiny --rounds 2 --batch 6

A random-weight jina-embeddings-v4 in its published layout (the 'bench' shape's sizes, three task
LoRAs of rank 4) on the CPU, fp32. One batch of requests whose tasks cycle through retrieval,
text-matching and code runs as ``mixed`` (one forward; the base matmuls once for all rows, each task's
LoRA on its rows' slice of the batch: the default) and as ``grouped`` (one forward per task: the
batch split as a batcher grouping by task would); ``one task`` (every request retrieval, one
forward) is the floor. One warm-up run of each, then alternating rounds; prints ms per request (the
median round) and the ratio to ``grouped``, checks that both ways give the same vectors, and
records the machine's load average before and after (the machine may be shared).
"""

from __future__ import annotations

import qwen25vl_embed_server  # noqa: F401  (first: it sets MKL's dispatch before torch loads)

# isort: split

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bench.common import SHAPES, Benchmark, alternating, noise_images, relative_difference
from qwen25vl_embed_server.core.fixtures.tiny_jina import build_tiny_jina
from qwen25vl_embed_server.core.model.extractor import Extractor, Prepared
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model
from qwen25vl_embed_server.core.retrieval.recipes import JINA_TASKS

BENCH = Benchmark(__spec__.name, __doc__)

TEXT = "what does the quarterly report say about revenue in the northern region"


def jina_checkpoint(shape: str) -> Path:
    """The random-weight jina-embeddings-v4 of ``shape``, built once under ``~/.cache``."""
    root = Path.home() / ".cache" / "qwen25vl-embed" / f"bench-jina-{shape}"
    if not (root / "adapters" / "adapter_model.safetensors").exists():
        build_tiny_jina(root, SHAPES[shape])
    return root


def batch(extractor: Extractor, kind: str, size: int, tasks: Sequence[str]) -> list[Prepared]:
    """``size`` requests of ``kind`` ("text": queries of one length; "image": 448x448 documents),
    their tasks cycling through ``tasks``."""
    if kind == "text":
        return [extractor.prepare([], TEXT, prompt_format="query", task=tasks[i % len(tasks)]) for i in range(size)]
    images = noise_images([(448, 448)] * size)
    return [
        extractor.prepare([image], "", prompt_format="document", task=tasks[i % len(tasks)])
        for i, image in enumerate(images)
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = BENCH.parser(argv)
    parser.add_argument("--shape", choices=("tiny", "bench"), default="bench")
    parser.add_argument("--kinds", nargs="+", choices=("text", "image"), default=["text", "image"])
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    extractor = Extractor(load_model(LoadOptions(model=str(jina_checkpoint(args.shape)), device="cpu")))
    rows = []
    summary = {}
    per_round = {}
    load_before = os.getloadavg()
    for kind in args.kinds:
        mixed = batch(extractor, kind, args.batch, JINA_TASKS)
        single = [dataclasses.replace(item, task=JINA_TASKS[0]) for item in mixed]

        def side(items: list[Prepared], batching: str) -> Callable[[], float]:
            def run() -> float:
                extractor.adapter_batching = batching
                started = time.perf_counter()
                extractor.run(items)
                return (time.perf_counter() - started) / len(items) * 1e3

            return run

        sides = {"mixed": side(mixed, "mixed"), "grouped": side(mixed, "grouped"), "one task": side(single, "mixed")}
        vectors = {}
        for name, batching in (("mixed", "mixed"), ("grouped", "grouped")):
            extractor.adapter_batching = batching
            vectors[name] = np.concatenate([r.tensors["single_vector"] for r in extractor.run(mixed)])
        difference = relative_difference(vectors["mixed"], vectors["grouped"])
        for warm_up in sides.values():  # first calls allocate
            warm_up()
        times = alternating(sides, args.rounds)
        per_round[kind] = times
        grouped = statistics.median(times["grouped"])
        summary[f"{kind}: mixed / grouped, speed"] = round(grouped / statistics.median(times["mixed"]), 2)
        for name, values in times.items():
            ms = statistics.median(values)
            print(f"{kind:5} {name:9} {ms:8.2f} ms/request  x{grouped / ms:4.2f} vs grouped", flush=True)
            rows.append({"requests": kind, "batching": name, "ms/request": ms, "vs grouped": grouped / ms})
        print(f"{kind:5} mixed vs grouped: rel diff {difference:.1e}", flush=True)
    extractor.adapter_batching = "mixed"
    load = {"before": [round(value, 2) for value in load_before], "after": [round(v, 2) for v in os.getloadavg()]}
    print(f"load average (1, 5, 15 min) before {load['before']}, after {load['after']} on {os.cpu_count()} CPUs")
    details = {"shape": args.shape, "batch": args.batch, "rounds": args.rounds, "tasks": list(JINA_TASKS)}
    details |= {"load average (1, 5, 15 min)": load, "ms/request per round": per_round}
    BENCH.write(args, rows, summary=summary, details=details)


if __name__ == "__main__":
    main()
