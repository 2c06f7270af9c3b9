"""Index a folder of images into an embedded vector database and search it by text or by image.

The server runs a retrieval model (ColQwen2.5: one 128-d vector per token). Each image is stored
in Qdrant's local mode (an embedded database in a folder; no server process) with two vectors:

- ``mean``: the mean of the document's token vectors, L2-normalised: one cosine vector per image,
  for a fast first stage;
- ``tokens``: the token vectors themselves (optionally token-pooled), a Qdrant multivector.

A search embeds the query (text: the recipe's query format; image: the document format), takes
the first stage's candidates, then reranks them by MaxSim on their token vectors
(:func:`qwen25vl_embed.maxsim`).

Why Qdrant local mode: ``pip install qdrant-client`` is pure Python (numpy), stores to a folder,
has native multivectors with a MaxSim comparator (so the rerank can be cross-checked by the
database itself), and the same client code runs against a Qdrant server when the index outgrows
one process. LanceDB also stores multivectors but brings a native engine and pyarrow.

Usage (offline, on a random-weight ColQwen2.5; or serve a real ColQwen2.5 adapter or checkpoint)::

    qwen25vl-embed make-tiny-model tiny-colqwen --recipe colqwen2.5
    qwen25vl-embed serve --model tiny-colqwen/adapter &
    python examples/search/search.py --server localhost:50051 --images photos/ --db index/ \\
        --text "a red bicycle" --image photos/query.png --pool-factor 2
"""

from __future__ import annotations

import argparse
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from qdrant_client import QdrantClient, models

from qwen25vl_embed import EmbeddingClient, maxsim, pool_tokens, storage_bytes

COLLECTION = "images"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Hit:
    path: str
    score: float


def _mean_vector(tokens: npt.NDArray[np.float32]) -> list[float]:
    mean = tokens.mean(axis=0)
    return [float(x) for x in mean / max(float(np.linalg.norm(mean)), 1e-12)]


def _named(vectors: object, name: str) -> object:
    """One named vector of a point fetched with ``with_vectors=[name]``."""
    assert isinstance(vectors, dict), f"expected named vectors, got {type(vectors).__name__}"
    return vectors[name]


def index_folder(client: EmbeddingClient, folder: Path, db: QdrantClient, pool_factor: int = 1) -> tuple[int, int, int]:
    """Embed every image of ``folder`` (one ExtractBatch stream) into the collection.

    Returns ``(images, bytes of token vectors, bytes stored)``: storage before and after pooling.
    """
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    documents = client.embed_images(paths)
    stored = [pool_tokens(d, pool_factor) if pool_factor > 1 else d for d in documents]
    dimension = int(documents[0].shape[1])
    if db.collection_exists(COLLECTION):
        db.delete_collection(COLLECTION)
    db.create_collection(
        COLLECTION,
        vectors_config={
            "mean": models.VectorParams(size=dimension, distance=models.Distance.COSINE),
            "tokens": models.VectorParams(
                size=dimension,
                distance=models.Distance.DOT,
                multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM),
            ),
        },
    )
    db.upsert(
        COLLECTION,
        [
            models.PointStruct(
                id=str(uuid.uuid5(uuid.NAMESPACE_URL, str(path))),
                vector={"mean": _mean_vector(tokens), "tokens": tokens.tolist()},
                payload={"path": str(path)},
            )
            for path, tokens in zip(paths, stored, strict=True)
        ],
    )
    return len(paths), storage_bytes(documents), storage_bytes(stored)


def search(
    db: QdrantClient, query: npt.NDArray[np.float32], candidates: int = 20, limit: int = 5
) -> tuple[list[Hit], list[Hit]]:
    """``(reranked, database)``: the first stage's candidates reranked by MaxSim here, and the
    database's own MaxSim ranking over the same candidates (prefetch + multivector query)."""
    first = db.query_points(
        COLLECTION, query=_mean_vector(query), using="mean", limit=candidates, with_vectors=["tokens"]
    )
    docs = [np.asarray(_named(point.vector, "tokens"), dtype=np.float32) for point in first.points]
    scores = maxsim(query, docs)
    order = np.argsort(-scores, kind="stable")[:limit]
    reranked = [Hit(str((first.points[i].payload or {})["path"]), float(scores[i])) for i in order]
    native = db.query_points(
        COLLECTION,
        prefetch=models.Prefetch(query=_mean_vector(query), using="mean", limit=candidates),
        query=query.tolist(),
        using="tokens",
        limit=limit,
    )
    database = [Hit(str((p.payload or {})["path"]), float(p.score)) for p in native.points]
    return reranked, database


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="address of a server running a multi-vector recipe")
    parser.add_argument("--images", type=Path, required=True, help="folder of images to index")
    parser.add_argument("--db", type=Path, required=True, help="folder of the embedded Qdrant database")
    parser.add_argument("--text", action="append", default=[], help="a text query (repeatable)")
    parser.add_argument("--image", action="append", type=Path, default=[], help="an image query (repeatable)")
    parser.add_argument("--pool-factor", type=int, default=1, help="token pooling factor of stored vectors (1: none)")
    parser.add_argument("--limit", type=int, default=5)
    args = parser.parse_args()

    db = QdrantClient(path=str(args.db))
    with EmbeddingClient(args.server) as client:
        recipe = client.info().recipe
        if recipe is None or recipe.output != "multi_vector":
            parser.error("the server must run a multi-vector recipe (e.g. ColQwen2.5)")
        count, raw, stored = index_folder(client, args.images, db, args.pool_factor)
        print(f"indexed {count} images: token vectors {raw} bytes, stored {stored} bytes ({stored / raw:.0%})")
        queries = [(f"text {t!r}", q) for t, q in zip(args.text, client.embed_queries(args.text), strict=True)]
        queries += [(f"image {p}", q) for p, q in zip(args.image, client.embed_images(args.image), strict=True)]
        for label, query in queries:
            reranked, _ = search(db, query, limit=args.limit)
            print(label)
            for hit in reranked:
                print(f"  {hit.score:8.3f}  {hit.path}")
    db.close()


if __name__ == "__main__":
    main()
