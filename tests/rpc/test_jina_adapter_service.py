"""One server, one base, three kinds of adapter: ColQwen2.5, BiQwen2.5 and jina-embeddings-v4 (its
tasks) over real gRPC on 127.0.0.1 with the real SDK.

Each jina task equals the independent reference (transformers + peft: ``tests/jina_reference.py``);
each ColQwen2.5 / BiQwen2.5 adapter equals a server loaded with that adapter alone; all within 1e-5
relative in fp32, callers of every adapter, every task and the raw base at once included. The
command line (``extract --server --adapter --task``) and the bulk actor carry adapter and task.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import grpc
import numpy as np
import pytest

from qwen25vl_embed import EmbeddingClient, EmbeddingError
from qwen25vl_embed_server.core.fixtures.tiny_adapters import TinyAdapters, build_tiny_adapters
from qwen25vl_embed_server.core.model.loading import LoadOptions
from qwen25vl_embed_server.core.retrieval.adapter_spec import AdapterSpec
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import adapter_servers, assert_batched_close, noise_image, png_bytes
from ..jina_reference import TASKS, Reference

PICTURES = [noise_image(224, 224, seed=41), noise_image(140, 196, seed=42)]
IMAGES = [png_bytes(picture) for picture in PICTURES]
TEXTS = ["where is the cat", "quarterly revenue", "def add(a, b): return a + b"]
OTHERS = ("colqwen", "biqwen")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyAdapters:
    return build_tiny_adapters(tmp_path_factory.mktemp("three-adapters-rpc"), jina=True)


@pytest.fixture(scope="module")
def reference(tiny: TinyAdapters) -> Reference:
    return Reference(tiny.adapters["jina"])


@pytest.fixture(scope="module")
def servers(tiny: TinyAdapters) -> Iterator[dict[str, BackgroundServer]]:
    """``shared``: the base with the three adapters; "colqwen", "biqwen": that adapter alone."""
    with adapter_servers(tiny, alone=OTHERS) as running:
        yield running


@pytest.fixture(scope="module")
def clients(servers: dict[str, BackgroundServer]) -> Iterator[dict[str, EmbeddingClient]]:
    with ExitStack() as stack:
        yield {name: stack.enter_context(EmbeddingClient(server.address)) for name, server in servers.items()}


def _unit(vector: np.ndarray) -> np.ndarray:
    unit: np.ndarray = vector / np.linalg.norm(vector)
    return unit


def test_info_lists_three_adapters_with_recipes_tasks_and_sizes(clients: dict[str, EmbeddingClient]) -> None:
    info = clients["shared"].info()
    assert info.recipe is None
    listed = [(a.name, a.recipe.name, a.recipe.output, a.recipe.dimension, a.recipe.tasks) for a in info.adapters]
    assert listed == [
        ("colqwen", "colqwen2.5", "multi_vector", 128, ()),
        ("biqwen", "biqwen2.5", "single_vector", 64, ()),
        ("jina", "jina-v4", "single_vector", 64, TASKS),
    ]
    assert info.adapters[2].recipe.matryoshka_dims == (4, 8, 16, 32, 64)
    assert {"single_vector", "multi_vector"} <= set(info.outputs)
    served = {a.name: (a.recipe.outputs, a.recipe.multi_vector_dimension) for a in info.adapters}
    jina_rows = (
        clients["shared"]
        .extract(IMAGES[0], outputs=["multi_vector"], prompt_format="document", adapter="jina")
        .tensors["multi_vector"]
    )
    assert served == {
        "colqwen": (("multi_vector",), 128),
        "biqwen": (("single_vector",), 0),
        "jina": (("single_vector", "multi_vector"), jina_rows.shape[-1]),
    }


@pytest.mark.parametrize("task", TASKS)
def test_each_jina_task_equals_the_reference(
    clients: dict[str, EmbeddingClient], reference: Reference, task: str
) -> None:
    shared = clients["shared"]
    queries = shared.embed_queries(TEXTS, adapter="jina", task=task)
    passages = shared.embed_passages(TEXTS, adapter="jina", task=task)
    images = shared.embed_images(IMAGES, adapter="jina", task=task)
    for text, query, passage in zip(TEXTS, queries, passages, strict=True):
        assert_batched_close(query[0], reference.embed(task, None, text)["single"], f"{task} query {text}")
        assert_batched_close(passage[0], reference.embed(task, None, text, passage=True)["single"], f"{task} {text}")
    for index, vector in enumerate(images):
        assert_batched_close(vector[0], reference.embed(task, PICTURES[index])["single"], f"{task} image {index}")
    multi = shared.extract(IMAGES[1], outputs=["multi_vector"], prompt_format="document", adapter="jina", task=task)
    assert_batched_close(multi["multi_vector"], reference.embed(task, PICTURES[1])["multi"], f"{task} multi")


def test_jina_matryoshka_sizes(clients: dict[str, EmbeddingClient], reference: Reference) -> None:
    (short,) = clients["shared"].embed_queries([TEXTS[1]], 8, adapter="jina", task="code")
    assert short.shape == (1, 8)
    assert_batched_close(short[0], _unit(reference.embed("code", None, TEXTS[1])["single"][:8]), "dimensions=8")


@pytest.mark.parametrize("adapter", OTHERS)
def test_colqwen_and_biqwen_equal_their_own_servers(clients: dict[str, EmbeddingClient], adapter: str) -> None:
    shared, alone = clients["shared"], clients[adapter]
    pairs = [
        (shared.embed_images(IMAGES, adapter=adapter), alone.embed_images(IMAGES)),
        (shared.embed_queries(TEXTS, adapter=adapter), alone.embed_queries(TEXTS)),
    ]
    for ours, theirs in pairs:
        for got, want in zip(ours, theirs, strict=True):
            assert got.shape == want.shape
            assert_batched_close(got, want, adapter)


def test_callers_of_every_adapter_and_task_at_once(clients: dict[str, EmbeddingClient], reference: Reference) -> None:
    """ColQwen2.5, BiQwen2.5, the three jina tasks and the raw base at the same time: batched together
    as they come; each answer its own."""
    shared = clients["shared"]
    expected: dict[str, list[np.ndarray]] = {
        name: [*clients[name].embed_images(IMAGES), *clients[name].embed_queries(TEXTS)] for name in OTHERS
    }
    for task in TASKS:
        images = [reference.embed(task, picture)["single"][None] for picture in PICTURES]
        expected[task] = images + [reference.embed(task, None, text)["single"][None] for text in TEXTS]
    base = [shared.extract(image, outputs=["lm_pooled_mean"])["lm_pooled_mean"] for image in IMAGES]

    def vectors(who: str) -> list[np.ndarray]:
        adapter, task = (who, None) if who in OTHERS else ("jina", who)
        images = shared.embed_images(IMAGES, adapter=adapter, task=task)
        return [*images, *shared.embed_queries(TEXTS, adapter=adapter, task=task)]

    def raw(index: int) -> np.ndarray:
        return shared.extract(IMAGES[index], outputs=["lm_pooled_mean"])["lm_pooled_mean"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        adapted = {who: [pool.submit(vectors, who) for _ in range(2)] for who in expected}
        plain = [pool.submit(raw, index % 2) for index in range(4)]
        for who, futures in adapted.items():
            for future in futures:
                for got, want in zip(future.result(), expected[who], strict=True):
                    assert_batched_close(got, want, who)
        for index, done in enumerate(plain):
            assert_batched_close(done.result(), base[index % 2], "base")


@pytest.mark.parametrize(
    ("adapter", "task", "dimensions", "message"),
    [
        ("jina", "summarise", 0, "unknown task 'summarise'; expected one of retrieval, text-matching, code"),
        ("colqwen", "code", 0, "task 'code' is not available: its recipe colqwen2.5 has none"),
        ("jina", "code", 5, "dimensions=5 is not one of jina-v4's Matryoshka sizes: 4, 8, 16, 32, 64"),
        ("jinna", "code", 0, "unknown adapter 'jinna'; this server's adapters: colqwen, biqwen, jina"),
    ],
)
def test_bad_adapter_and_task_requests_are_invalid_argument(
    clients: dict[str, EmbeddingClient], adapter: str, task: str, dimensions: int, message: str
) -> None:
    with pytest.raises(EmbeddingError) as caught:
        clients["shared"].embed_queries(["x"], dimensions or None, adapter=adapter, task=task)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details


def test_a_task_or_a_recipe_output_of_the_raw_base_is_invalid_argument(clients: dict[str, EmbeddingClient]) -> None:
    with pytest.raises(EmbeddingError) as caught:
        clients["shared"].extract(None, "x", task="code")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "task 'code' is not available" in caught.value.details
    with pytest.raises(EmbeddingError) as caught:
        clients["shared"].extract(IMAGES[0], outputs=["single_vector"])
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs an adapter" in caught.value.details


def test_extract_command_sends_adapter_and_task(
    servers: dict[str, BackgroundServer], reference: Reference, tmp_path: Path
) -> None:
    """``qwen25vl-embed extract --server ... --adapter jina --task code``: the saved vector is code's."""
    from qwen25vl_embed_server.cli.app import main

    image = tmp_path / "page.png"
    image.write_bytes(IMAGES[0])
    address = servers["shared"].address
    args = ["extract", str(image), "--server", address, "--outdir", str(tmp_path / "out"), "--flat"]
    assert main([*args, "--adapter", "jina", "--task", "code", "--outputs", "single_vector"]) == 0
    saved = np.load(tmp_path / "out" / "page" / "single_vector.npy")
    assert_batched_close(saved[0], reference.embed("code", PICTURES[0])["single"], "extract --adapter --task")


def test_ray_serve_settings_carry_the_jina_adapter(tiny: TinyAdapters) -> None:
    from qwen25vl_embed_server.ray.deployment import EmbedderSettings

    settings = EmbedderSettings(model=str(tiny.base), adapters={"jina": str(tiny.adapters["jina"])})
    assert settings.load_options().adapters == (AdapterSpec("jina", str(tiny.adapters["jina"])),)


def test_the_bulk_actor_runs_the_job_adapter_and_task(tiny: TinyAdapters, reference: Reference, tmp_path: Path) -> None:
    import torch

    from qwen25vl_embed_server.ray.bulk_actor import BulkExtractionActor
    from qwen25vl_embed_server.ray.bulk_job import BulkJob

    paths = []
    for index, data in enumerate(IMAGES):
        paths.append(tmp_path / f"image{index}.png")
        paths[-1].write_bytes(data)
    load = LoadOptions(
        str(tiny.base), device="cpu", dtype="float32", adapters=(AdapterSpec("jina", str(tiny.adapters["jina"])),)
    )
    job = BulkJob(
        source=str(tmp_path),
        output=tmp_path / "out",
        load=load,
        outputs=("single_vector",),
        adapter="jina",
        task="text-matching",
    )
    before = torch.get_num_threads()
    try:  # the actor sets its process's torch threads (Ray gives it a process of its own)
        actor = BulkExtractionActor(job)
        table = actor({"path": np.array([str(path) for path in paths])})
    finally:
        torch.set_num_threads(before)
    assert table.column("error").to_pylist() == [None, None]
    for row, picture in enumerate(PICTURES):
        expected = reference.embed("text-matching", picture)["single"]
        got = np.asarray(table.column("single_vector")[row].as_py(), np.float32).reshape(expected.shape)
        assert_batched_close(got, expected, f"bulk row {row}")
