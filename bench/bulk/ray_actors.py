"""Ray Data bulk extraction on the CPU: images/s with 1 actor vs 2 actors, in one run.

    python -m bench.bulk.ray_actors [--images 1600] [--side 448] [--batch-size 8]

One local Ray instance (``ray.init(num_cpus=2)``), the offline tiny model, the same JPEG files
for every configuration, a fresh output folder each time. Each figure is what a user of
``qwen25vl-embed bulk`` sees: wall time from the job's start to its last Parquet file, actor
start and model loading included. Configurations:

- 1 actor, 1 CPU (torch on 1 thread)
- 2 actors, 1 CPU each: the actor pool's scaling, the figure docs/performance.md quotes
- 1 actor, 2 CPUs (torch on 2 threads): the same cores used by one model instead
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.common import Benchmark, noise_image
from qwen25vl_embed_server.core.fixtures.tiny_model import build_tiny_model
from qwen25vl_embed_server.core.model.loading import LoadOptions
from qwen25vl_embed_server.ray.bulk_job import BulkJob, BulkReport, run_bulk

BENCH = Benchmark(__spec__.name, __doc__)
CONFIGURATIONS = ((1, 1.0), (2, 1.0), (1, 2.0))  # (actors, CPUs per actor)


def main(argv: Sequence[str] | None = None) -> None:
    parser = BENCH.parser(argv)
    parser.add_argument("--images", type=int, default=1600)
    parser.add_argument("--side", type=int, default=448, help="image width and height in pixels")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    import ray

    with tempfile.TemporaryDirectory(prefix="ray-bulk-bench-") as scratch:
        root = Path(scratch)
        model = build_tiny_model(root / "tiny")
        images = root / "images"
        images.mkdir()
        for index in range(args.images):
            picture = noise_image(args.side, args.side, np.random.default_rng(index))
            picture.save(images / f"{index:05d}.jpg", quality=90)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        try:
            reports: dict[tuple[int, float], BulkReport] = {}
            for actors, cpus in CONFIGURATIONS:
                job = BulkJob(
                    source=str(images),
                    output=root / f"out-{actors}x{cpus:g}",
                    load=LoadOptions(model=str(model), device="cpu", dtype="float32"),
                    batch_size=args.batch_size,
                    actors=actors,
                    cpus_per_actor=cpus,
                )
                reports[actors, cpus] = run_bulk(job)
        finally:
            ray.shutdown()

    print(
        f"\n{args.images} images of {args.side}x{args.side}, tiny model, pooled vectors, batch size "
        f"{args.batch_size}, ray.init(num_cpus=2) on {os.cpu_count()} cores:"
    )
    for (actors, cpus), report in reports.items():
        print(
            f"  {actors} actor(s) x {cpus:g} CPU: {report.images_per_second:6.2f} images/s "
            f"({report.written} in {report.seconds:.1f} s)"
        )
    one, two = reports[1, 1.0].images_per_second, reports[2, 1.0].images_per_second
    print(f"  2 actors / 1 actor: {two / one:.2f}x")
    rows = [
        {"actors": actors, "CPUs per actor": cpus, "images/s": r.images_per_second, "seconds": r.seconds}
        for (actors, cpus), r in reports.items()
    ]
    settings = {"images": args.images, "side": args.side, "batch_size": args.batch_size}
    BENCH.write(args, rows, summary={"2 actors / 1 actor": two / one}, details=settings)


if __name__ == "__main__":
    main()
