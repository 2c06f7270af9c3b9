"""examples/search: a folder indexed into LanceDB with an ANN index and searched, on the tiny
ColQwen2.5 (multivectors, MaxSim) and the tiny BiQwen2.5 (single vectors).

Random weights test the plumbing and exactness, not relevance: every score the example returns is
compared with a MaxSim (or dot product) computed here with numpy from the vectors the SDK returns
on another call, and an image query finds its own image first (MaxSim of a document with itself is
the highest possible). Random-weight documents can score within float rounding of each other, so
rankings are checked only where scores differ by more than a tolerance.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator, Sequence
from itertools import pairwise
from pathlib import Path
from types import ModuleType
from typing import Any

import lancedb
import numpy as np
import pyarrow.parquet as pq
import pytest

import qwen25vl_embed_server.ray.parquet_format as parquet_format
from qwen25vl_embed import EmbeddingClient
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.finishing import Extraction
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import noise_image, server_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "search" / "search.py"
SIZES = [(224, 224), (168, 112), (112, 224), (140, 140), (196, 84), (84, 168)]


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("search_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def colqwen_client(colqwen: Extractor) -> Iterator[EmbeddingClient]:
    with BackgroundServer(colqwen, server_config()) as running, EmbeddingClient(running.address) as client:
        yield client


@pytest.fixture(scope="module")
def biqwen_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddingClient]:
    from qwen25vl_embed_server.core.fixtures.tiny_retrieval import build_tiny_retrieval

    adapter = build_tiny_retrieval(tmp_path_factory.mktemp("biqwen"), "biqwen2.5")
    biqwen = Extractor(load_model(LoadOptions(model=str(adapter), device="cpu", dtype="float32")))
    with BackgroundServer(biqwen, server_config()) as running, EmbeddingClient(running.address) as client:
        yield client


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images = tmp_path_factory.mktemp("photos")
    for seed, size in enumerate(SIZES):
        noise_image(*size, seed=10 + seed).save(images / f"photo{seed}.png")
    (images / "notes.txt").write_text("not an image")
    return images


def reference_scores(query: np.ndarray, documents: Sequence[np.ndarray]) -> np.ndarray:
    """MaxSim of ``query`` against each document over their non-zero rows, in float64, a loop."""
    q = np.asarray(query, np.float64)
    q = q[np.any(q != 0, axis=1)]
    scores = []
    for document in documents:
        d = np.asarray(document, np.float64)
        d = d[np.any(d != 0, axis=1)]
        scores.append(sum(max(float(row @ token) for token in d) for row in q))
    return np.asarray(scores)


def assert_matches_reference(hits: list[Any], reference: dict[str, float], atol: float, complete: bool = True) -> None:
    """Each hit's score is the reference's and the hits are ranked by score, up to ``atol``; with
    ``complete``, they are the best ones too (an image scoring within ``atol`` of the last hit may
    take its place). An ANN index may miss a candidate: its results are checked not complete."""
    assert hits
    for hit in hits:
        assert hit.score == pytest.approx(reference[hit.path], abs=atol), hit.path
    for above, below in pairwise(hits):
        assert reference[above.path] >= reference[below.path] - atol, (above, below)
    if not complete:
        return
    returned = {hit.path for hit in hits}
    weakest = min(reference[path] for path in returned)
    for path, score in reference.items():
        if path not in returned:
            assert score <= weakest + atol, (path, score, weakest)


def test_colqwen_index_then_search_by_image_and_text(
    example: ModuleType, colqwen_client: EmbeddingClient, folder: Path, tmp_path: Path
) -> None:
    paths = example.image_paths(folder)
    assert [p.name for p in paths] == [f"photo{i}.png" for i in range(len(SIZES))]
    documents = list(example.documents_from_server(colqwen_client, paths))
    # The stream returns each image's vectors in order: as the SDK's embed_images call does.
    expected = colqwen_client.embed_images(paths)
    assert [path for path, _ in documents] == [str(p) for p in paths]
    for (_, vectors), reference in zip(documents, expected, strict=True):
        np.testing.assert_allclose(vectors, reference, rtol=1e-5, atol=1e-6)

    table = example.create_table(lancedb.connect(tmp_path / "db"), documents, "multi_vector")
    assert table.count_rows() == len(paths)
    assert example.build_index(table) >= 0
    assert [index.index_type for index in table.list_indices()] == ["IvfHnswSq"]

    by_image = colqwen_client.embed_images([paths[2]])[0]
    by_text = colqwen_client.embed_queries(["a photo of noise"])[0]
    for query in (by_image, by_text):
        scores = dict(zip(map(str, paths), reference_scores(query, expected), strict=True))
        tq = int(np.any(query != 0, axis=1).sum())
        # The index's candidates reranked on the stored float32 vectors: MaxSim within float rounding.
        reranked = example.search(table, query, limit=4, candidates=6)
        assert_matches_reference(reranked, scores, atol=1e-4 * tq, complete=False)
        # The same over every image (LanceDB's brute-force scan, no index): the best four.
        assert_matches_reference(example.search(table, query, limit=4, exact=True), scores, atol=1e-4 * tq)
        # LanceDB's own brute-force MaxSim (Tq - cosine distance).
        exact = example.search(table, query, limit=4, rerank=False, exact=True)
        assert_matches_reference(exact, scores, atol=1e-4 * tq)
        # The index's scores come from 8-bit quantised vectors: close, not equal.
        for hit in example.search(table, query, limit=6, rerank=False):
            assert hit.score == pytest.approx(scores[hit.path], abs=0.1 * tq), hit.path

    # Against its own vectors a document scores its number of image tokens, the maximum possible.
    own = example.search(table, by_image, limit=1, candidates=6)
    assert own[0].path == str(paths[2])
    assert own[0].score == pytest.approx(np.any(by_image != 0, axis=1).sum(), rel=1e-5)


def test_token_pooling_stores_fewer_vectors(
    example: ModuleType, colqwen_client: EmbeddingClient, folder: Path, tmp_path: Path
) -> None:
    paths = example.image_paths(folder)
    documents = list(example.documents_from_server(colqwen_client, paths))
    table = example.create_table(lancedb.connect(tmp_path / "db"), documents, "multi_vector", pool_factor=2)
    stored = table.to_arrow().column("vector").to_pylist()
    for (_, vectors), rows in zip(documents, stored, strict=True):
        image_tokens = int(np.any(vectors != 0, axis=1).sum())
        assert 1 <= len(rows) <= max(image_tokens // 2, 1)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(rows), axis=1), 1.0, rtol=1e-5)
    example.build_index(table)
    query = colqwen_client.embed_queries(["a photo of noise"])[0]
    reference = dict(zip(map(str, paths), reference_scores(query, [np.asarray(r) for r in stored]), strict=True))
    assert_matches_reference(example.search(table, query, limit=3, exact=True), reference, atol=1e-4 * len(query))


def test_biqwen_single_vectors(
    example: ModuleType, biqwen_client: EmbeddingClient, folder: Path, tmp_path: Path
) -> None:
    paths = example.image_paths(folder)
    documents = list(example.documents_from_server(biqwen_client, paths))
    expected = biqwen_client.embed_images(paths)
    assert all(vectors.shape == (1, expected[0].shape[1]) for _, vectors in documents)
    table = example.create_table(lancedb.connect(tmp_path / "db"), documents, "single_vector")
    example.build_index(table)
    for query in (biqwen_client.embed_queries(["a photo of noise"])[0], expected[4]):
        reference = {
            str(p): float(np.asarray(query, np.float64)[0] @ np.asarray(e, np.float64)[0])
            for p, e in zip(paths, expected, strict=True)
        }
        reranked = example.search(table, query, limit=3, candidates=6)
        assert_matches_reference(reranked, reference, atol=1e-5, complete=False)
        assert_matches_reference(example.search(table, query, limit=3, exact=True), reference, atol=1e-5)
        for hit in example.search(table, query, limit=6, rerank=False):
            assert hit.score == pytest.approx(reference[hit.path], abs=0.1), hit.path
    own = example.search(table, expected[4], limit=1, candidates=6)
    assert own[0].path == str(paths[4])
    assert own[0].score == pytest.approx(1.0, abs=1e-5)


def test_parquet_from_bulk_indexes_the_same(
    example: ModuleType, colqwen_client: EmbeddingClient, folder: Path, tmp_path: Path
) -> None:
    """A bulk output folder (written by the bulk job's own writer) gives the same table, its
    failed rows skipped."""
    paths = example.image_paths(folder)
    vectors = colqwen_client.embed_images(paths)
    outcomes: list[Extraction | str] = [
        Extraction(
            tensors={"multi_vector": v},
            visual_token_lens=np.asarray([int(np.any(v != 0, axis=1).sum())]),
            image_grid_thw=np.asarray([[1, 2, 2]]),
            image_token_positions=np.arange(1),
            sequence_length=v.shape[0],
        )
        for v in vectors
    ]
    schema = parquet_format.output_schema(["multi_vector"])
    output = tmp_path / "bulk"
    output.mkdir()
    table = parquet_format._table([*map(str, paths), "/missing.png"], [*outcomes, "cannot decode"], schema)
    pq.write_table(table, output / "part-0.parquet")

    read = list(example.documents_from_parquet(output, "multi_vector"))
    assert [path for path, _ in read] == [str(p) for p in paths]
    for (_, got), want in zip(read, vectors, strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="no column 'single_vector'"):
        list(example.documents_from_parquet(output, "single_vector"))


def test_zero_rows_are_dropped_because_lancedb_cannot_score_them(example: ModuleType, tmp_path: Path) -> None:
    """Why the example stores only non-zero rows: LanceDB leaves a document with a zero row out of
    a cosine multivector search (cosine is undefined on it); without the row it is found."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((3, 8)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    masked = np.vstack([rows, np.zeros((1, 8), np.float32)])
    query = rows[:2]
    db = lancedb.connect(tmp_path / "db")
    raw = example.create_table(db, [("a", rows), ("b", rows)], "multi_vector")
    raw.add([{"path": "masked", "vector": masked.tolist()}])  # as the model returns it
    found = [hit.path for hit in example.search(raw, query, limit=3, rerank=False, exact=True)]
    assert sorted(found) == ["a", "b"]
    stored = example.create_table(db, [("a", rows), ("masked", masked)], "multi_vector")
    hits = example.search(stored, query, limit=2, exact=True)
    assert sorted(hit.path for hit in hits) == ["a", "masked"]
    assert all(hit.score == pytest.approx(2.0, abs=1e-5) for hit in hits)
