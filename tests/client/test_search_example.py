"""examples/search: a folder indexed into Qdrant's local mode and searched, on the tiny ColQwen2.5.

Random weights test the plumbing and exactness, not relevance: an image query finds its own image
first (MaxSim of a document with itself is the highest possible), and the rerank done with the
SDK's maxsim agrees with the database's own MaxSim.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from qdrant_client import QdrantClient

from qwen25vl_embed import EmbeddingClient
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import noise_image, server_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "search" / "search.py"


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
def search_client(colqwen: Extractor) -> Iterator[EmbeddingClient]:
    with BackgroundServer(colqwen, server_config()) as running, EmbeddingClient(running.address) as client:
        yield client


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images = tmp_path_factory.mktemp("photos")
    for seed, size in enumerate([(224, 224), (168, 112), (112, 224), (140, 140)]):
        noise_image(*size, seed=10 + seed).save(images / f"photo{seed}.png")
    return images


def assert_same_ranking(reranked: list[Any], database: list[Any], rtol: float = 1e-4) -> None:
    """The two MaxSims score each image alike, and each ranks by its scores.

    Random-weight documents can score within a float rounding step of each other; the SDK (numpy)
    and the database sum in different orders, so two such images may swap places. The ranking
    holds where the scores differ by more than the tolerance.
    """
    ours = {hit.path: hit.score for hit in reranked}
    theirs = {hit.path: hit.score for hit in database}
    assert ours.keys() == theirs.keys()
    for path, score in ours.items():
        assert theirs[path] == pytest.approx(score, rel=rtol), path
    for ranking in (reranked, database):
        for above, below in pairwise(ranking):
            tolerance = rtol * max(abs(ours[above.path]), abs(ours[below.path]))
            assert ours[above.path] >= ours[below.path] - tolerance, (above, below)


@pytest.mark.parametrize("pool_factor", [1, 2])
def test_index_then_search_by_image_and_text(
    example: ModuleType, search_client: EmbeddingClient, folder: Path, tmp_path: Path, pool_factor: int
) -> None:
    db = QdrantClient(path=str(tmp_path / "db"))
    try:
        count, raw, stored = example.index_folder(search_client, folder, db, pool_factor)
        assert count == 4
        assert stored == raw if pool_factor == 1 else stored <= raw * 0.6

        by_image = search_client.embed_images([folder / "photo2.png"])[0]
        reranked, database = example.search(db, by_image, candidates=4, limit=4)
        if pool_factor == 1:  # against its own unpooled vectors a document scores T, the maximum
            assert reranked[0].path == str(folder / "photo2.png")
            assert reranked[0].score == pytest.approx(by_image.shape[0], rel=1e-5)

        by_text = search_client.embed_queries(["a photo of noise"])[0]
        for query in (by_image, by_text):
            reranked, database = example.search(db, query, candidates=4, limit=4)
            assert_same_ranking(reranked, database)
    finally:
        db.close()
