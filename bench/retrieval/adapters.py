"""One base with three retrieval adapters against three single-adapter models: resident memory and
images/s, and mixed-adapter batches (a LoRA per row) against batches grouped by adapter.

    python -m bench.retrieval.adapters                  # the bench checkpoint, fp32: several minutes on 2 cores
    python -m bench.retrieval.adapters --quick          # the tiny shape, a few images: a smoke run
    python -m bench.retrieval.adapters --output x.json  # elsewhere than bench/results/retrieval-adapters-<cpu>.json

The checkpoint: a ColQwen2.5 base of the bench shape (``bench.common.SHAPES``, random weights) with
three LoRA adapters on it, rank ``--rank`` (vidore's ColQwen2.5 uses 32): ColQwen2.5 (``colqwen``),
BiQwen2.5 (``biqwen``) and a second ColQwen2.5 (``colqwen-b``).

Memory: each configuration loaded in a process of its own (one process holding the base and the
three adapters; three processes each holding one adapter merged into its own copy of the base),
then one document run through each adapter; the resident set (VmRSS) after that, summed over the
processes of a configuration. Throughput: in this process, ``--images`` noise documents per adapter
(448 x 448, the document format), batches of ``--batch`` requests of the three adapters interleaved
(as a shared server's batcher forms them from mixed traffic): the shared base running each batch as
one forward with each row's LoRA ("mixed"), the shared base running one forward per adapter
("grouped"), and the three single-adapter models each running its own adapter's requests in
batches of the same size. Alternating rounds; the median round's images/s, and the machine's load
average before and after (the machine may be shared).
"""

from __future__ import annotations

import qwen25vl_embed_server  # noqa: F401  (first: it sets MKL's dispatch before torch loads)

# isort: split
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.common import ROOT, SHAPES, Benchmark, alternating, noise_images
from qwen25vl_embed_server.core.fixtures.tiny_adapters import add_lora
from qwen25vl_embed_server.core.fixtures.tiny_retrieval import build_tiny_retrieval
from qwen25vl_embed_server.core.model.extractor import Extractor, Prepared
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model
from qwen25vl_embed_server.core.retrieval.adapter_spec import AdapterSpec

BENCH = Benchmark(__spec__.name, __doc__)
log = logging.getLogger(__name__)

KINDS = {"colqwen": "colqwen2.5", "biqwen": "biqwen2.5", "colqwen-b": "colqwen2.5"}
SIDE = 448


def build(folder: Path, shape: str, rank: int) -> tuple[Path, dict[str, Path]]:
    """The base and the three adapters under ``folder``."""
    build_tiny_retrieval(folder / "col", "colqwen2.5", SHAPES[shape])
    base = folder / "col" / "base"
    adapters = {
        name: add_lora(base, folder / name, kind, seed=index + 1, rank=rank)
        for index, (name, kind) in enumerate(KINDS.items())
    }
    return base, adapters


def options(model: Path, adapters: dict[str, Path] | None = None) -> LoadOptions:
    specs = tuple(AdapterSpec(name, str(path)) for name, path in (adapters or {}).items())
    return LoadOptions(model=str(model), device="cpu", dtype="float32", adapters=specs)


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(spec: str) -> None:
    """In a process of its own: load ``spec``'s model, run one document per adapter, print the RSS."""
    wanted = json.loads(spec)
    adapters = {name: Path(path) for name, path in wanted["adapters"].items()}
    extractor = Extractor(load_model(options(Path(wanted["model"]), adapters)))
    image = noise_images([(SIDE, SIDE)], seed=1)
    for name in adapters or [None]:
        extractor.run([extractor.prepare(image, "", prompt_format="document", adapter=name)])
    print(json.dumps({"rss": resident_bytes()}))


def measured_rss(model: Path, adapters: dict[str, Path]) -> int:
    spec = json.dumps({"model": str(model), "adapters": {name: str(path) for name, path in adapters.items()}})
    done = subprocess.run(
        [sys.executable, "-m", BENCH.module, "--child", spec],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    rss: int = json.loads(done.stdout.strip().splitlines()[-1])["rss"]
    return rss


def documents(extractor: Extractor, adapter: str | None, count: int, seed: int) -> list[Prepared]:
    images = noise_images([(SIDE, SIDE)] * count, seed=seed)
    return [extractor.prepare([image], "", prompt_format="document", adapter=adapter) for image in images]


def timed(batches: Sequence[Callable[[], object]], images: int) -> Callable[[], float]:
    def run() -> float:
        started = time.perf_counter()
        for batch in batches:
            batch()
        return images / (time.perf_counter() - started)

    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = BENCH.parser(argv)
    parser.add_argument("--images", type=int, default=8, help="documents per adapter (8)")
    parser.add_argument("--batch", type=int, default=6, help="requests per batch (6)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank of the adapters (32)")
    parser.add_argument("--quick", action="store_true", help="the tiny shape, 3 images per adapter, 1 round")
    parser.add_argument("--child", help="internal: measure one configuration's memory")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    shape, count, rounds = ("tiny", 3, 1) if args.quick else ("bench", args.images, args.rounds)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        base, adapters = build(Path(folder), shape, args.rank)
        shared_rss = measured_rss(base, adapters)
        single_rss = {name: measured_rss(path, {}) for name, path in adapters.items()}
        shared = Extractor(load_model(options(base, adapters)))
        singles = {name: Extractor(load_model(options(path))) for name, path in adapters.items()}
        mine = {name: documents(shared, name, count, seed=i) for i, name in enumerate(adapters)}
        theirs = {name: documents(singles[name], None, count, seed=i) for i, name in enumerate(adapters)}
        interleaved = [item for row in zip(*mine.values(), strict=True) for item in row]
        total = len(interleaved)

        def shared_run(batching: str, batch: list[Prepared]) -> Callable[[], object]:
            def run() -> object:
                shared.adapter_batching = batching
                return shared.run(batch)

            return run

        def single_run(extractor: Extractor, batch: list[Prepared]) -> Callable[[], object]:
            return lambda: extractor.run(batch)

        chunks = [interleaved[i : i + args.batch] for i in range(0, total, args.batch)]
        sides = {
            "one base, three adapters: mixed batches (a LoRA per row)": timed(
                [shared_run("mixed", chunk) for chunk in chunks], total
            ),
            "one base, three adapters: batches grouped by adapter": timed(
                [shared_run("grouped", chunk) for chunk in chunks], total
            ),
            "three single-adapter models": timed(
                [
                    single_run(singles[name], items[i : i + args.batch])
                    for name, items in theirs.items()
                    for i in range(0, count, args.batch)
                ],
                total,
            ),
        }
        for side in sides.values():  # warm-up: first calls allocate
            side()
        measured = alternating(sides, rounds)
    single_total = sum(single_rss.values())
    speed = {name: statistics.median(values) for name, values in measured.items()}
    rows: list[dict[str, object]] = [
        {
            "row": name,
            "images/s": round(speed[name], 2),
            "resident MiB": round((shared_rss if name.startswith("one base") else single_total) / 2**20),
        }
        for name in measured
    ]
    mixed, grouped, separate = speed.values()
    summary = {
        "resident memory, three single-adapter processes / one shared": round(single_total / shared_rss, 2),
        "images/s, mixed / grouped": round(mixed / grouped, 2),
        "images/s, mixed / three single-adapter models": round(mixed / separate, 2),
    }
    for row in rows:
        print(f"{row['row']:<60} {row['images/s']:>8.2f} img/s {row['resident MiB']:>7} MiB")
    for key, value in summary.items():
        print(f"{key}: {value}")
    details = {
        "shape": shape,
        "lora rank": args.rank,
        "images per adapter": count,
        "batch": args.batch,
        "rounds": rounds,
        "image side": SIDE,
        "images/s per round": measured,
        "single-adapter processes, resident MiB": {name: round(rss / 2**20) for name, rss in single_rss.items()},
        "load average (1, 5, 15 min)": {
            "before": [round(value, 2) for value in load_before],
            "after": [round(value, 2) for value in os.getloadavg()],
        },
    }
    print(f"load average (1, 5, 15 min): {details['load average (1, 5, 15 min)']} on {os.cpu_count()} CPUs")
    BENCH.write(args, rows, summary=summary, details=details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
