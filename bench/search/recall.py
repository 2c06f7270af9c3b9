"""Recall@10 of examples/search's ANN index (LanceDB IVF_HNSW_SQ) against exact search, with its
build time and query latencies.

    python -m bench.search.recall                   # 2,000 images per recipe: about 2 minutes on 2 cores
    python -m bench.search.recall --items 200       # a quick look
    python -m bench.search.recall --output x.json   # elsewhere than bench/results/search-recall-<cpu>.json

For each recipe, the tiny random-weight ColQwen2.5 (multivectors, MaxSim) and BiQwen2.5 (one
vector per image), served over gRPC on 127.0.0.1: ``--items`` noise images of 56 to 112 pixels a
side are embedded through ``extract_many`` and stored by the example
(``create_table``, zero rows dropped), then indexed (``build_index``). Queries: ``--queries`` text
queries (random words) and as many held-out noise images. Exact search is brute force in numpy
over the stored float32 vectors (``qwen25vl_embed.maxsim`` for multivectors, a matrix product for
single vectors); recall@10 is the share of the exact top 10 that a search returns in its top 10,
averaged over the queries. Searches: the index alone (its scores on 8-bit quantised vectors), and
the index's 40 candidates reranked exactly (the example's default). Latencies are per query,
the median of all queries, one query at a time.

Random weights make vectors that crowd together (far more alike than a trained model's), which is
hard for any ANN index: the recall here is a floor for this index and these settings, not a
prediction for a trained checkpoint.
"""

from __future__ import annotations

import qwen25vl_embed_server  # noqa: F401  (first: it sets MKL's dispatch before torch loads)

# isort: split
import importlib.util
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import lancedb
import numpy as np

from bench.common import ROOT, Benchmark, noise_image
from qwen25vl_embed import EmbeddingClient, maxsim
from qwen25vl_embed_server.core.fixtures.tiny_retrieval import build_tiny_retrieval
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model
from qwen25vl_embed_server.rpc.harness import BackgroundServer
from qwen25vl_embed_server.rpc.server import ServerConfig

BENCH = Benchmark(__spec__.name, __doc__)
log = logging.getLogger(__name__)

RECIPES = {"colqwen2.5": "multi_vector", "biqwen2.5": "single_vector"}
K = 10
WORDS = ["red", "blue", "bicycle", "street", "cat", "window", "river", "house", "tree", "car", "sky", "dog", "night"]


def load_example() -> ModuleType:
    """examples/search/search.py as a module."""
    path = ROOT / "examples" / "search" / "search.py"
    spec = importlib.util.spec_from_file_location("search_example", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_images(folder: Path, count: int, seed: int) -> list[Path]:
    """``count`` noise PNGs of 56 to 112 pixels a side (multiples of 28), drawn from one generator."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    paths = []
    for index in range(count):
        width, height = (int(side) * 28 for side in rng.integers(2, 5, size=2))
        path = folder / f"{index:05d}.png"
        noise_image(width, height, rng).save(path)
        paths.append(path)
    return paths


def text_queries(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 6)))) for _ in range(count)]


def exact_top(query: np.ndarray, stored: Sequence[np.ndarray], multi: bool) -> tuple[list[int], np.ndarray]:
    """The exact top ``K`` (indices) and every score."""
    if multi:
        q = query[np.any(query != 0, axis=1)]
        scores = maxsim(q, stored)
    else:
        scores = np.stack([s[0] for s in stored]) @ query[0]
    return [int(i) for i in np.argsort(-scores, kind="stable")[:K]], scores


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def measure(
    example: ModuleType, client: EmbeddingClient, kind: str, paths: list[Path], queries: list[np.ndarray], db: Path
) -> dict[str, Any]:
    multi = kind == "multi_vector"
    documents, embed_seconds = timed(lambda: list(example.documents_from_server(client, paths)))
    table, store_seconds = timed(lambda: example.create_table(lancedb.connect(db), documents, kind))
    build_seconds = example.build_index(table)
    index = {str(p): i for i, p in enumerate(paths)}
    stored = [example.stored_form(v) if multi else v.reshape(1, -1) for _, v in documents]
    recalls: dict[str, list[float]] = {"index": [], "index + rerank": []}
    latencies: dict[str, list[float]] = {"index": [], "index + rerank": [], "exact (numpy)": []}
    for query in queries:
        start = time.perf_counter()
        truth, _ = exact_top(query, stored, multi)
        latencies["exact (numpy)"].append(time.perf_counter() - start)
        for name, rerank in (("index", False), ("index + rerank", True)):
            start = time.perf_counter()
            hits = example.search(table, query, limit=K, rerank=rerank)
            latencies[name].append(time.perf_counter() - start)
            recalls[name].append(len({index[h.path] for h in hits} & set(truth)) / K)
    vectors = sum(s.shape[0] for s in stored)
    return {
        "items": len(paths),
        "vectors stored": vectors,
        "dimensions": int(stored[0].shape[1]),
        "embed: images/s": len(paths) / embed_seconds,
        "store: s": store_seconds,
        "index build: s": build_seconds,
        "recall@10: index": float(np.mean(recalls["index"])),
        "recall@10: index + rerank": float(np.mean(recalls["index + rerank"])),
        "p50 ms: index": 1000 * float(np.median(latencies["index"])),
        "p50 ms: index + rerank": 1000 * float(np.median(latencies["index + rerank"])),
        "p50 ms: exact (numpy)": 1000 * float(np.median(latencies["exact (numpy)"])),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = BENCH.parser(argv)
    parser.add_argument("--items", type=int, default=2000, help="images indexed per recipe")
    parser.add_argument("--queries", type=int, default=50, help="text queries, and as many image queries")
    args = parser.parse_args(argv)
    example = load_example()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        paths = write_images(root / "images", args.items, seed=0)
        held_out = write_images(root / "queries", args.queries, seed=1)
        texts = text_queries(args.queries, seed=2)
        for recipe, kind in RECIPES.items():
            adapter = build_tiny_retrieval(root / recipe, recipe)
            extractor = Extractor(load_model(LoadOptions(model=str(adapter), device="cpu", dtype="float32")))
            with (
                BackgroundServer(extractor, ServerConfig(port=0)) as running,
                EmbeddingClient(running.address) as client,
            ):
                queries = [*client.embed_queries(texts), *client.embed_images(held_out)]
                row = {"recipe": recipe, "queries": len(queries)}
                row |= measure(example, client, kind, paths, queries, root / f"db-{recipe}")
            log.info("%s", row)
            rows.append(row)
    for row in rows:
        print(
            "  ".join(
                f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}" for key, value in row.items()
            )
        )
    details = {"index": "LanceDB IVF_HNSW_SQ, cosine; one partition per 4,096 stored vectors", "k": K}
    BENCH.write(args, rows, details=details | {"lancedb": lancedb.__version__})


if __name__ == "__main__":
    main()
