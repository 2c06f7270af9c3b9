"""jina-embeddings-v4 over gRPC: a real server on 127.0.0.1 serving the tiny checkpoint in the
published layout, the real SDK, every task and output against the independent reference
(:mod:`tests.jina_reference`), and the refusals a caller sees."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from qwen25vl_embed import EmbeddingClient, EmbeddingError
from qwen25vl_embed_server.core.fixtures.tiny_jina import build_tiny_jina
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import assert_batched_close, noise_image, server_config
from ..jina_reference import TASKS, Reference

IMAGES = [noise_image(224, 224, seed=21), noise_image(140, 196, seed=22)]
TEXTS = ["where is the cat", "quarterly revenue", "def add(a, b): return a + b"]


@pytest.fixture(scope="module")
def jina_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_jina(tmp_path_factory.mktemp("jina-rpc"))


@pytest.fixture(scope="module")
def reference(jina_path: Path) -> Reference:
    return Reference(jina_path)


@pytest.fixture(scope="module")
def jina_client(jina_path: Path) -> Iterator[EmbeddingClient]:
    extractor = Extractor(load_model(LoadOptions(model=str(jina_path), device="cpu", dtype="float32")))
    with BackgroundServer(extractor, server_config()) as server, EmbeddingClient(server.address) as client:
        yield client


def _unit(vector: np.ndarray) -> np.ndarray:
    unit: np.ndarray = vector / np.linalg.norm(vector)
    return unit


def test_info_names_the_recipe_tasks_and_sizes(jina_client: EmbeddingClient) -> None:
    info = jina_client.info()
    assert info.recipe is not None
    assert (info.recipe.name, info.recipe.output, info.recipe.dimension) == ("jina-v4", "single_vector", 64)
    assert info.recipe.tasks == TASKS
    assert info.recipe.matryoshka_dims == (4, 8, 16, 32, 64)
    assert info.default_outputs == ("single_vector",)
    assert "multi_vector" in info.outputs
    assert info.recipe.outputs == ("single_vector", "multi_vector")
    rows = jina_client.extract(IMAGES[0], outputs=["multi_vector"], prompt_format="document").tensors["multi_vector"]
    assert info.recipe.multi_vector_dimension == rows.shape[-1] > 0


@pytest.mark.parametrize("task", TASKS)
def test_queries_passages_and_images_equal_the_reference(
    jina_client: EmbeddingClient, reference: Reference, task: str
) -> None:
    queries = jina_client.embed_queries(TEXTS, task=task)
    passages = jina_client.embed_passages(TEXTS, task=task)
    images = jina_client.embed_images(IMAGES, task=task)
    for text, query, passage in zip(TEXTS, queries, passages, strict=True):
        assert_batched_close(query[0], reference.embed(task, None, text)["single"], f"{task} query {text}")
        assert_batched_close(passage[0], reference.embed(task, None, text, passage=True)["single"], f"{task} {text}")
    for index, (image, vector) in enumerate(zip(IMAGES, images, strict=True)):
        assert_batched_close(vector[0], reference.embed(task, image)["single"], f"{task} image {index}")


def test_multi_vectors_and_matryoshka_sizes(jina_client: EmbeddingClient, reference: Reference) -> None:
    result = jina_client.extract(IMAGES[0], outputs=["multi_vector"], prompt_format="document", task="code")
    assert_batched_close(result.tensors["multi_vector"], reference.embed("code", IMAGES[0])["multi"], "multi")
    (short,) = jina_client.embed_passages([TEXTS[1]], dimensions=8, task="retrieval")
    full = reference.embed("retrieval", None, TEXTS[1], passage=True)["single"]
    assert short.shape == (1, 8)
    assert_batched_close(short[0], _unit(full[:8]), "dimensions=8")


def test_callers_of_different_tasks_at_once(jina_client: EmbeddingClient, reference: Reference) -> None:
    """Concurrent streams of the three tasks: the server batches them together as they come
    (mixed in one forward, each row its task's LoRA); each vector is its own task's."""
    with ThreadPoolExecutor(len(TASKS)) as pool:
        futures = {task: pool.submit(jina_client.embed_queries, TEXTS * 3, task=task) for task in TASKS}
        results = {task: future.result() for task, future in futures.items()}
    for task, vectors in results.items():
        for text, vector in zip(TEXTS * 3, vectors, strict=True):
            assert_batched_close(vector[0], reference.embed(task, None, text)["single"], f"{task} {text}")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"task": "summarize"}, "unknown task 'summarize'; expected one of retrieval, text-matching, code"),
        ({"dimensions": 5}, "dimensions=5 is not one of jina-v4's Matryoshka sizes: 4, 8, 16, 32, 64"),
        ({"dimensions": 128}, "dimensions=128 is out of range"),
    ],
)
def test_bad_settings_are_invalid_argument(
    jina_client: EmbeddingClient, settings: dict[str, object], message: str
) -> None:
    with pytest.raises(EmbeddingError) as caught:
        jina_client.embed_queries(["x"], **settings)  # type: ignore[arg-type]
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details


def test_multi_vector_sizes_are_refused(jina_client: EmbeddingClient) -> None:
    with pytest.raises(EmbeddingError) as caught:
        jina_client.extract(None, "x", outputs=["multi_vector"], prompt_format="query", dimensions=8)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "dimensions applies to jina-v4's single_vector only" in caught.value.details


def test_a_task_on_a_server_without_tasks(client: EmbeddingClient) -> None:
    with pytest.raises(EmbeddingError) as caught:
        client.extract(None, "x", task="code")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "task 'code' is not available: it serves no retrieval recipe" in caught.value.details
