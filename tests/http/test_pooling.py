"""``POST /pooling``: token vectors per input, as vLLM's pooling route returns them; ColQwen2.5's
multi-vectors equal to the gRPC service's."""

from __future__ import annotations

import base64

import httpx
import numpy as np

from .conftest import TIMEOUT, Pair, image_message, image_png


def test_colqwen_documents_and_queries_equal_grpc(colqwen_pair: Pair) -> None:
    data = image_png(seed=2, width=84, height=84)
    with httpx.Client(base_url=colqwen_pair.url, timeout=TIMEOUT) as http:
        document = http.post("/pooling", json={"messages": image_message(data)})
        query = http.post("/pooling", json={"input": "where is the noise", "encoding_format": "base64"})
        narrow = http.post("/pooling", json={"input": "where is the noise", "dimensions": 32})
    for reply in (document, query, narrow):
        assert reply.status_code == 200, reply.text
    expected_document = colqwen_pair.sdk.extract(data, prompt_format="document", outputs=["multi_vector"])
    got_document = np.asarray(document.json()["data"][0]["data"], np.float32)
    np.testing.assert_array_equal(got_document, expected_document["multi_vector"])
    assert got_document.shape == (expected_document.sequence_length, 128)
    body = document.json()
    assert body["object"] == "list"
    assert body["data"][0]["object"] == "pooling"
    assert body["id"].startswith("pool-")
    assert body["usage"]["prompt_tokens"] == expected_document.sequence_length

    expected_query = colqwen_pair.sdk.extract(
        None, prompt="where is the noise", prompt_format="query", outputs=["multi_vector"]
    )
    rows = np.frombuffer(base64.b64decode(query.json()["data"][0]["data"]), "<f4").reshape(-1, 128)
    np.testing.assert_array_equal(rows, expected_query["multi_vector"])
    # Matryoshka: the first 32 components of each row, renormalised (zero rows stay zero).
    full = np.asarray(expected_query["multi_vector"], np.float64)[:, :32]
    norms = np.linalg.norm(full, axis=1, keepdims=True)
    reference = np.divide(full, norms, out=np.zeros_like(full), where=norms > 0)
    np.testing.assert_allclose(np.asarray(narrow.json()["data"][0]["data"]), reference, rtol=1e-5, atol=1e-6)


def test_one_vector_routes_send_a_multi_vector_checkpoint_to_pooling(colqwen_pair: Pair) -> None:
    with httpx.Client(base_url=colqwen_pair.url, timeout=TIMEOUT) as http:
        reply = http.post("/v1/embeddings", json={"input": "x"})
        cohere = http.post("/v2/embed", json={"texts": ["x"], "input_type": "search_query"})
    assert reply.status_code == cohere.status_code == 400
    assert "POST /pooling" in reply.json()["error"]["message"]
    assert "POST /pooling" in cohere.json()["message"]


def test_a_raw_checkpoint_pools_its_last_hidden_states(pair: Pair) -> None:
    with httpx.Client(base_url=pair.url, timeout=TIMEOUT) as http:
        reply = http.post("/pooling", json={"input": "abc def"})
    assert reply.status_code == 200, reply.text
    expected = pair.sdk.extract(None, prompt="abc def", prompt_format="raw", outputs=["lm_last_hidden"])
    np.testing.assert_array_equal(
        np.asarray(reply.json()["data"][0]["data"], np.float32), expected["lm_last_hidden"][0]
    )


def test_jina_v4_serves_its_single_vector_and_its_multi_vectors_on_pooling(jina_pair: Pair) -> None:
    with httpx.Client(base_url=jina_pair.url, timeout=TIMEOUT) as http:
        single = http.post("/v1/embeddings", json={"input": "where is the noise"})
        multi = http.post("/pooling", json={"input": "where is the noise"})
    for reply in (single, multi):
        assert reply.status_code == 200, reply.text
    expected = jina_pair.sdk.extract(
        None, prompt="where is the noise", prompt_format="query", outputs=["single_vector", "multi_vector"]
    )
    np.testing.assert_array_equal(
        np.asarray(single.json()["data"][0]["embedding"], np.float32), expected["single_vector"][0]
    )
    rows = np.asarray(multi.json()["data"][0]["data"], np.float32)
    np.testing.assert_array_equal(rows, expected["multi_vector"])
    assert rows.shape[1] == 128
