"""Index a folder of images into LanceDB and search it by text or by image, on an ANN index.

The server runs a retrieval recipe: ColQwen2.5 (``multi_vector``: one L2-normalised 128-d vector
per token) or BiQwen2.5 (``single_vector``: one per image). The images go to the server over one
ExtractBatch stream (``extract_many``: ordered, a bounded window in flight) in the recipe's
document format; a Parquet folder written by ``qwen25vl-embed bulk`` is read instead with
``--parquet``. Each image becomes one row of a LanceDB table (an embedded database in a folder;
no server process):

- ``multi_vector``: the column is a multivector (``list<fixed_size_list<float32, E>>``), indexed
  with IVF_HNSW_SQ on cosine distance (the only metric LanceDB allows on multivectors). A query
  ``[Tq, E]`` is a MaxSim search: LanceDB's distance is ``sum over query tokens of (1 - max
  cosine)`` = ``Tq - MaxSim`` when every vector has unit length, which ColQwen2.5's have;
- ``single_vector``: a ``fixed_size_list<float32, E>`` column, IVF_HNSW_SQ on cosine distance
  (``1 - q . d`` on unit vectors).

The index scores on 8-bit quantised vectors; the candidates it returns are rescored here exactly
(:func:`qwen25vl_embed.maxsim` on the stored float32 vectors) unless ``--no-rerank``.

ColQwen2.5's documents carry a zero row per non-image token (the reference's masking). Cosine is
undefined on them, so they are dropped before storage: a query token whose similarities to every
image token are negative then contributes its largest (negative) similarity instead of 0.

Usage (offline, on a random-weight ColQwen2.5; or serve a real ColQwen2.5 adapter or checkpoint)::

    qwen25vl-embed make-tiny-model tiny-colqwen --recipe colqwen2.5
    qwen25vl-embed serve --model tiny-colqwen/adapter &
    python examples/search/search.py --server localhost:50051 --images photos/ --db index/ \\
        --text "a red bicycle" --image photos/query.png --pool-factor 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import lancedb
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
from lancedb.index import IvfHnswSq
from lancedb.query import LanceVectorQueryBuilder

from qwen25vl_embed import EmbeddingClient, PromptFormat, maxsim, pool_tokens
from qwen25vl_embed.embeddings import retrieval_vectors

TABLE = "images"
MULTI_VECTOR = "multi_vector"
SINGLE_VECTOR = "single_vector"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

Vectors = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Hit:
    """One result: the image's path and its score (MaxSim, or the dot product of single vectors)."""

    path: str
    score: float


def image_paths(folder: Path) -> list[Path]:
    """The images of ``folder`` (by suffix), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def documents_from_server(client: EmbeddingClient, paths: Sequence[Path]) -> Iterator[tuple[str, Vectors]]:
    """``(path, vectors)`` of each image in order: one ExtractBatch stream in the document format."""
    results = client.extract_many(paths, prompt_format=PromptFormat.DOCUMENT)
    for path, result in zip(paths, results, strict=True):
        yield str(path), np.asarray(retrieval_vectors(result), dtype=np.float32)


def documents_from_parquet(folder: Path, column: str = MULTI_VECTOR) -> Iterator[tuple[str, Vectors]]:
    """``(path, vectors)`` of each row of a ``bulk`` output folder (or one Parquet file) that has
    ``column``; rows whose image failed (``error`` set) are skipped. A token output is stored
    flattened beside its ``<column>_shape``; a pooled one is one vector."""
    files = [folder] if folder.is_file() else sorted(folder.glob("*.parquet"))
    for file in files:
        table = pq.read_table(file)
        if column not in table.column_names:
            raise ValueError(f"{file} has no column {column!r}; its columns: {table.column_names}")
        shapes = table.column(f"{column}_shape").to_pylist() if f"{column}_shape" in table.column_names else None
        errors = table.column("error").to_pylist() if "error" in table.column_names else [None] * table.num_rows
        for row, (path, error) in enumerate(zip(table.column("path").to_pylist(), errors, strict=True)):
            if error is not None:
                continue
            values = np.asarray(table.column(column)[row].values, dtype=np.float32)
            yield str(path), values.reshape(shapes[row] if shapes is not None else (1, -1))


def stored_form(vectors: Vectors, pool_factor: int = 1) -> Vectors:
    """What is stored of one document's ``[T, E]`` vectors: its non-zero rows, token-pooled."""
    kept = vectors[np.any(vectors != 0, axis=1)]
    if pool_factor > 1 and kept.shape[0] >= 2:
        kept = pool_tokens(kept, pool_factor)
    return np.ascontiguousarray(kept, dtype=np.float32)


def create_table(
    db: lancedb.DBConnection, documents: Iterable[tuple[str, Vectors]], kind: str, pool_factor: int = 1
) -> lancedb.table.Table:
    """A new table ``images`` (replacing one) of ``(path, vectors)`` rows; ``kind`` is the recipe's
    output (``multi_vector`` or ``single_vector``)."""
    paths: list[str] = []
    stored: list[Vectors] = []
    for path, vectors in documents:
        paths.append(path)
        stored.append(stored_form(vectors, pool_factor) if kind == MULTI_VECTOR else vectors.reshape(1, -1))
    if not stored:
        raise ValueError("no documents to index")
    dimension = int(stored[0].shape[1])
    values = pa.array(np.concatenate(stored).reshape(-1))
    rows = pa.FixedSizeListArray.from_arrays(values, dimension)
    if kind == MULTI_VECTOR:
        offsets = np.concatenate([[0], np.cumsum([v.shape[0] for v in stored])]).astype(np.int32)
        column: pa.Array = pa.ListArray.from_arrays(pa.array(offsets), rows)
    elif kind == SINGLE_VECTOR:
        column = rows
    else:
        raise ValueError(f"kind must be {MULTI_VECTOR!r} or {SINGLE_VECTOR!r}, got {kind!r}")
    table = pa.table({"path": pa.array(paths, pa.string()), "vector": column})
    return db.create_table(TABLE, data=table, mode="overwrite")


def build_index(table: lancedb.table.Table) -> float:
    """Build the ANN index (IVF_HNSW_SQ, cosine) on the vectors; returns the seconds it took.

    One IVF partition per ~4,096 stored vectors (tokens, for multivectors), at least one."""
    vectors = _stored_vectors(table)
    partitions = max(1, vectors // 4096)
    start = time.perf_counter()
    table.create_index("vector", config=IvfHnswSq(distance_type="cosine", num_partitions=partitions))
    return time.perf_counter() - start


def _stored_vectors(table: lancedb.table.Table) -> int:
    column = table.to_arrow().column("vector")
    if pa.types.is_list(column.type):
        return int(sum(len(chunk.values) for chunk in column.chunks))
    return int(table.count_rows())


def search(
    table: lancedb.table.Table,
    query: Vectors,
    limit: int = 10,
    candidates: int | None = None,
    rerank: bool = True,
    exact: bool = False,
) -> list[Hit]:
    """The ``limit`` best images for ``query`` (``[Tq, E]``; ``[1, E]`` for single vectors).

    The index proposes ``candidates`` images (default: ``4 * limit`` with ``rerank``, else
    ``limit``); with ``rerank`` they are rescored exactly on their stored vectors and the best
    ``limit`` kept, else the index's own scores are returned. ``exact`` bypasses the index (a
    brute-force scan by LanceDB)."""
    multi = pa.types.is_list(table.schema.field("vector").type)
    wanted = candidates if candidates is not None else (4 * limit if rerank else limit)
    q = np.asarray(query, dtype=np.float32)
    if multi:  # an image query has the zero rows of a document; cosine is undefined on them
        q = stored_form(q)
    builder = cast(LanceVectorQueryBuilder, table.search(q if multi else q.reshape(-1), vector_column_name="vector"))
    builder = builder.distance_type("cosine")
    if exact:
        builder = builder.bypass_vector_index()
    found = builder.limit(wanted).select(["path", "vector", "_distance"]).to_arrow()
    paths = [str(p) for p in found.column("path").to_pylist()]
    if not rerank:
        # LanceDB's cosine distance: Tq - MaxSim for multivectors, 1 - q . d for single vectors.
        offset = q.shape[0] if multi else 1
        return [Hit(p, offset - float(d)) for p, d in zip(paths, found.column("_distance").to_pylist(), strict=True)]
    documents = [_vectors(found.column("vector")[i], q.shape[1]) for i in range(found.num_rows)]
    scores = maxsim(q, documents)
    order = np.argsort(-scores, kind="stable")[:limit]
    return [Hit(paths[i], float(scores[i])) for i in order]


def _vectors(cell: Any, dimension: int) -> Vectors:
    """One stored row back as ``[T, E]`` (``[1, E]`` for a single vector)."""
    values = cell.values
    if pa.types.is_fixed_size_list(values.type):
        values = values.flatten()
    return np.asarray(values, dtype=np.float32).reshape(-1, dimension)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="address of a server running a retrieval recipe")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="folder of images to index (embedded by the server)")
    source.add_argument("--parquet", type=Path, help="a bulk output folder (or Parquet file) to index")
    parser.add_argument("--db", type=Path, required=True, help="folder of the LanceDB database")
    parser.add_argument("--text", action="append", default=[], help="a text query (repeatable)")
    parser.add_argument("--image", action="append", type=Path, default=[], help="an image query (repeatable)")
    parser.add_argument("--pool-factor", type=int, default=1, help="token pooling of stored multivectors (1: none)")
    parser.add_argument("--limit", type=int, default=5, help="results per query")
    parser.add_argument("--no-rerank", action="store_true", help="return the index's own (approximate) scores")
    args = parser.parse_args()

    db = lancedb.connect(args.db)
    with EmbeddingClient(args.server) as client:
        recipe = client.info().recipe
        if recipe is None:
            parser.error("the server must run a retrieval recipe (ColQwen2.5 or BiQwen2.5)")
        start = time.perf_counter()
        if args.images is not None:
            documents = documents_from_server(client, image_paths(args.images))
        else:
            documents = documents_from_parquet(args.parquet, recipe.output)
        table = create_table(db, documents, recipe.output, args.pool_factor)
        stored = time.perf_counter() - start
        seconds = build_index(table)
        print(f"indexed {table.count_rows()} images in {stored:.1f} s; ANN index built in {seconds:.2f} s")
        queries = [(f"text {t!r}", q) for t, q in zip(args.text, client.embed_queries(args.text), strict=True)]
        queries += [(f"image {p}", q) for p, q in zip(args.image, client.embed_images(args.image), strict=True)]
        for label, query in queries:
            print(label)
            for hit in search(table, query, limit=args.limit, rerank=not args.no_rerank):
                print(f"  {hit.score:8.3f}  {hit.path}")


if __name__ == "__main__":
    main()
