"""``task`` and ``adapter`` on the HTTP routes, each answer compared with the gRPC service's for
the same request (the real SDK against the same server; within 1e-5, the two edges may batch
differently): jina-embeddings-v4's tasks in jina's API names, through ``httpx`` and through the
official OpenAI client's ``extra_body``; retrieval adapters on one base, by ``adapter`` or by
``model`` as ``GET /v1/models`` lists them; and the refusals, with the gRPC edge's message.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import openai
import pytest

from qwen25vl_embed import EmbeddingError
from qwen25vl_embed_server.core.fixtures.tiny_adapters import build_tiny_adapters
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model
from qwen25vl_embed_server.core.retrieval.adapter_spec import AdapterSpec
from qwen25vl_embed_server.http.selection import split_task

from .conftest import TIMEOUT, Pair, data_url, image_message, image_png

TEXTS = ["where is the noise", "quarterly revenue rose", "def add(a, b): return a + b"]
JINA_TASKS = ["retrieval.query", "retrieval.passage", "text-matching", "code.query", "code.passage", "code"]
RTOL = ATOL = 1e-5


@pytest.fixture(scope="module")
def adapters_pair(serving_pair: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """The tiny base with ColQwen2.5 (``colqwen``), BiQwen2.5 (``biqwen``) and jina-embeddings-v4
    (``jina``) adapters."""
    tiny = build_tiny_adapters(Path(tmp_path_factory.mktemp("http-adapters")), jina=True)
    specs = tuple(map(AdapterSpec.parse, tiny.flags()))
    model = load_model(LoadOptions(str(tiny.base), device="cpu", dtype="float32", adapters=specs))
    with serving_pair(Extractor(model)) as running:
        yield running


def post(pair: Pair, route: str, body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(base_url=pair.url, timeout=TIMEOUT) as http:
        return http.post(route, json=body)


def vectors(reply: httpx.Response) -> list[np.ndarray]:
    assert reply.status_code == 200, reply.text
    return [np.asarray(item["embedding"], np.float32) for item in reply.json()["data"]]


def grpc_texts(pair: Pair, texts: list[str], output: str, adapter: str = "", task: str = "") -> list[np.ndarray]:
    """The gRPC service's ``output`` for each text: a passage (document format) when the task's
    suffix says so, else a query; ``task`` sent in the checkpoint's own name."""
    name, role = split_task(task)
    prompt_format = "document" if role == "passage" else "query"
    return [
        pair.sdk.extract(None, prompt=text, prompt_format=prompt_format, outputs=[output], adapter=adapter, task=name)[
            output
        ]
        for text in texts
    ]


@pytest.mark.parametrize("task", JINA_TASKS)
def test_each_jina_task_equals_grpc(jina_pair: Pair, task: str) -> None:
    got = vectors(post(jina_pair, "/v1/embeddings", {"input": TEXTS, "task": task}))
    want = grpc_texts(jina_pair, TEXTS, "single_vector", task=task)
    for ours, theirs in zip(got, want, strict=True):
        np.testing.assert_allclose(ours, theirs[0], rtol=RTOL, atol=ATOL)


def test_tasks_and_roles_give_different_vectors(jina_pair: Pair) -> None:
    """The task reaches the model: each of jina's names gives its own vector (random LoRA factors)."""
    first = {
        task: vectors(post(jina_pair, "/v1/embeddings", {"input": TEXTS[0], "task": task}))[0] for task in JINA_TASKS
    }
    default = vectors(post(jina_pair, "/v1/embeddings", {"input": TEXTS[0]}))[0]
    np.testing.assert_allclose(default, first["retrieval.query"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(first["code"], first["code.query"], rtol=RTOL, atol=ATOL)
    distinct = [first[task] for task in JINA_TASKS if task != "code"]
    for index, one in enumerate(distinct):
        for other in distinct[index + 1 :]:
            assert np.abs(one - other).max() > 1e-3


def test_the_openai_client_sends_the_task_in_extra_body(jina_pair: Pair) -> None:
    with openai.OpenAI(base_url=f"{jina_pair.url}/v1", api_key="unused", timeout=TIMEOUT) as client:
        model = client.models.list().data[0].id
        reply = client.embeddings.create(input=TEXTS[:2], model=model, extra_body={"task": "retrieval.passage"})
    want = grpc_texts(jina_pair, TEXTS[:2], "single_vector", task="retrieval.passage")
    for item, theirs in zip(reply.data, want, strict=True):
        np.testing.assert_allclose(np.asarray(item.embedding, np.float32), theirs[0], rtol=RTOL, atol=ATOL)


def test_an_image_with_a_task_equals_grpc(jina_pair: Pair) -> None:
    image = image_png(7, 84, 56)
    reply = post(jina_pair, "/v1/embeddings", {"messages": image_message(image), "task": "code.passage"})
    want = jina_pair.sdk.extract(image, prompt_format="document", outputs=["single_vector"], task="code")
    np.testing.assert_allclose(vectors(reply)[0], want["single_vector"][0], rtol=RTOL, atol=ATOL)
    cohere = post(jina_pair, "/v2/embed", {"images": [data_url(image)], "input_type": "image", "task": "code"})
    assert cohere.status_code == 200, cohere.text
    np.testing.assert_allclose(
        np.asarray(cohere.json()["embeddings"]["float"][0]), want["single_vector"][0], rtol=RTOL, atol=ATOL
    )


def test_pooling_takes_the_task(jina_pair: Pair) -> None:
    reply = post(jina_pair, "/pooling", {"input": TEXTS[2], "task": "code.passage"})
    assert reply.status_code == 200, reply.text
    rows = np.asarray(reply.json()["data"][0]["data"], np.float32)
    (want,) = grpc_texts(jina_pair, TEXTS[2:], "multi_vector", task="code.passage")
    assert rows.shape == want.shape
    np.testing.assert_allclose(rows, want, rtol=RTOL, atol=ATOL)


def test_cohere_input_type_and_task_pick_passages(jina_pair: Pair) -> None:
    want = grpc_texts(jina_pair, TEXTS, "single_vector", task="text-matching.passage")
    for body in (
        {"texts": TEXTS, "input_type": "search_document", "task": "text-matching"},
        {"texts": TEXTS, "task": "text-matching.passage"},
    ):
        reply = post(jina_pair, "/v2/embed", body)
        assert reply.status_code == 200, reply.text
        for ours, theirs in zip(reply.json()["embeddings"]["float"], want, strict=True):
            np.testing.assert_allclose(np.asarray(ours, np.float32), theirs[0], rtol=RTOL, atol=ATOL)
    retrieval = grpc_texts(jina_pair, TEXTS[:1], "single_vector", task="retrieval.passage")[0]
    reply = post(jina_pair, "/v2/embed", {"texts": TEXTS[:1], "input_type": "search_document"})
    np.testing.assert_allclose(
        np.asarray(reply.json()["embeddings"]["float"][0], np.float32), retrieval[0], rtol=RTOL, atol=ATOL
    )
    clash = post(jina_pair, "/v2/embed", {"texts": TEXTS, "input_type": "search_query", "task": "retrieval.passage"})
    assert clash.status_code == 400
    assert "input_type search_query and task retrieval.passage disagree" in clash.json()["message"]


def grpc_refusal(pair: Pair, adapter: str = "", task: str = "") -> str:
    with pytest.raises(EmbeddingError) as caught:
        pair.sdk.extract(None, prompt=TEXTS[0], prompt_format="query", adapter=adapter, task=task)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return caught.value.details


@pytest.mark.parametrize("task", ["retrieval.passages", "summarize", "classification"])
def test_an_unknown_task_is_400_with_the_grpc_message(jina_pair: Pair, task: str) -> None:
    expected = grpc_refusal(jina_pair, task=task)
    for route, body in (("/v1/embeddings", {"input": TEXTS[0]}), ("/v2/embed", {"texts": TEXTS[:1]})):
        reply = post(jina_pair, route, {**body, "task": task})
        assert reply.status_code == 400, reply.text
        message = reply.json()["message"] if route == "/v2/embed" else reply.json()["error"]["message"]
        assert message == f"input 0: {expected}"
        assert "task" in message


def test_models_lists_the_adapters(adapters_pair: Pair) -> None:
    with httpx.Client(base_url=adapters_pair.url, timeout=TIMEOUT) as http:
        cards = http.get("/v1/models").json()["data"]
    served = cards[0]["id"]
    assert [(card["id"], card.get("parent")) for card in cards] == [
        (served, None),
        ("colqwen", served),
        ("biqwen", served),
        ("jina", served),
    ]


@pytest.mark.parametrize("field", ["adapter", "model"])
def test_an_adapter_by_name_or_model_equals_grpc(adapters_pair: Pair, field: str) -> None:
    reply = post(adapters_pair, "/v1/embeddings", {"input": TEXTS, field: "biqwen"})
    assert reply.json()["model"] == "biqwen"
    want = grpc_texts(adapters_pair, TEXTS, "single_vector", adapter="biqwen")
    for ours, theirs in zip(vectors(reply), want, strict=True):
        np.testing.assert_allclose(ours, theirs[0], rtol=RTOL, atol=ATOL)
    image = image_png(9, 56, 84)
    cohere = post(adapters_pair, "/v2/embed", {"images": [data_url(image)], field: "biqwen"})
    assert cohere.status_code == 200, cohere.text
    expected = adapters_pair.sdk.extract(image, prompt_format="document", outputs=["single_vector"], adapter="biqwen")
    got = np.asarray(cohere.json()["embeddings"]["float"][0], np.float32)
    np.testing.assert_allclose(got, expected["single_vector"][0], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("task", ["code.passage", "retrieval.query", "text-matching"])
def test_the_jina_adapter_with_a_task_equals_grpc(adapters_pair: Pair, task: str) -> None:
    """An adapter and a task in one request, on each route."""
    single = grpc_texts(adapters_pair, TEXTS, "single_vector", adapter="jina", task=task)
    for body in ({"adapter": "jina"}, {"model": "jina"}):
        reply = post(adapters_pair, "/v1/embeddings", {"input": TEXTS, "task": task, **body})
        for ours, theirs in zip(vectors(reply), single, strict=True):
            np.testing.assert_allclose(ours, theirs[0], rtol=RTOL, atol=ATOL)
    cohere = post(adapters_pair, "/v2/embed", {"texts": TEXTS, "task": task, "adapter": "jina"})
    assert cohere.status_code == 200, cohere.text
    for ours, theirs in zip(cohere.json()["embeddings"]["float"], single, strict=True):
        np.testing.assert_allclose(np.asarray(ours, np.float32), theirs[0], rtol=RTOL, atol=ATOL)
    pooled = post(adapters_pair, "/pooling", {"input": TEXTS[0], "task": task, "adapter": "jina"})
    assert pooled.status_code == 200, pooled.text
    (want,) = grpc_texts(adapters_pair, TEXTS[:1], "multi_vector", adapter="jina", task=task)
    rows = np.asarray(pooled.json()["data"][0]["data"], np.float32)
    assert rows.shape == want.shape
    np.testing.assert_allclose(rows, want, rtol=RTOL, atol=ATOL)


def test_pooling_with_a_multi_vector_adapter_equals_grpc(adapters_pair: Pair) -> None:
    with (
        openai.OpenAI(base_url=f"{adapters_pair.url}/v1", api_key="unused", timeout=TIMEOUT) as client,
        pytest.raises(openai.BadRequestError) as refused,
    ):
        client.embeddings.create(input=TEXTS[0], model="colqwen")
    assert "POST /pooling returns them" in str(refused.value)
    reply = post(adapters_pair, "/pooling", {"input": TEXTS[1], "model": "colqwen"})
    assert reply.status_code == 200, reply.text
    rows = np.asarray(reply.json()["data"][0]["data"], np.float32)
    (want,) = grpc_texts(adapters_pair, TEXTS[1:2], "multi_vector", adapter="colqwen")
    assert rows.shape == want.shape
    np.testing.assert_allclose(rows, want, rtol=RTOL, atol=ATOL)
    raw = post(adapters_pair, "/pooling", {"input": TEXTS[1]})
    assert raw.status_code == 200, raw.text
    assert np.asarray(raw.json()["data"][0]["data"]).shape[1] != rows.shape[1]  # the base's hidden states


def test_adapter_refusals(adapters_pair: Pair) -> None:
    expected = grpc_refusal(adapters_pair, adapter="colpali")
    reply = post(adapters_pair, "/v1/embeddings", {"input": TEXTS[0], "adapter": "colpali"})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["message"] == f"input 0: {expected}"
    assert "unknown adapter 'colpali'" in expected
    unknown_model = post(adapters_pair, "/v1/embeddings", {"input": TEXTS[0], "model": "colpali"})
    assert unknown_model.status_code == 404
    assert "'colqwen', 'biqwen'" in unknown_model.json()["error"]["message"]
    clash = post(adapters_pair, "/v1/embeddings", {"input": TEXTS[0], "model": "biqwen", "adapter": "colqwen"})
    assert clash.status_code == 400
    assert "model 'biqwen' and adapter 'colqwen' name different adapters" in clash.json()["error"]["message"]
    task = post(adapters_pair, "/v1/embeddings", {"input": TEXTS[0], "adapter": "biqwen", "task": "retrieval.query"})
    assert task.status_code == 400
    assert (
        task.json()["error"]["message"] == f"input 0: {grpc_refusal(adapters_pair, adapter='biqwen', task='retrieval')}"
    )


def test_split_task() -> None:
    assert split_task("retrieval.query") == ("retrieval", "query")
    assert split_task("code.passage") == ("code", "passage")
    assert split_task("text-matching") == ("text-matching", None)
    assert split_task(".passage") == (".passage", None)
    assert split_task("retrieval.passages") == ("retrieval.passages", None)
