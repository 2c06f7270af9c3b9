"""``POST /v2/embed`` as Cohere v2: images as data URIs, every embedding type, ``input_type`` and
``output_dimension``; vectors equal to the gRPC service's, the compact types computed here."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from ..helpers import assert_batched_close
from .conftest import TIMEOUT, Pair, data_url, image_png

TYPES = ["float", "int8", "uint8", "binary", "ubinary", "base64"]


@pytest.fixture(scope="module")
def http(pair: Pair) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pair.url, timeout=TIMEOUT) as client:
        yield client


def compact(vector: np.ndarray) -> dict[str, list[int]]:
    """Cohere's compact types of one float32 vector, as the docs state them (docs/http.md)."""
    int8 = np.clip(np.rint(vector.astype(np.float32) * np.float32(127)), -127, 127).astype(np.int64)
    bits = (vector > 0).astype(np.uint8)
    padded = np.concatenate([bits, np.zeros((-len(bits)) % 8, np.uint8)])
    ubinary = (padded.reshape(-1, 8) * (1 << np.arange(7, -1, -1))).sum(1)
    return {
        "int8": int8.tolist(),
        "uint8": (int8 + 128).tolist(),
        "ubinary": ubinary.tolist(),
        "binary": (ubinary - 128).tolist(),
    }


def embed(http: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    reply = http.post("/v2/embed", json=body)
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    return result


def test_images_in_every_embedding_type(pair: Pair, http: httpx.Client) -> None:
    images = [image_png(seed=seed, width=56 + 28 * seed, height=56) for seed in range(3)]
    body = embed(
        http,
        {"model": "", "images": [data_url(data) for data in images], "input_type": "image", "embedding_types": TYPES},
    )
    embeddings = body["embeddings"]
    assert sorted(embeddings) == sorted(TYPES)
    for index, data in enumerate(images):
        floats = np.asarray(embeddings["float"][index], np.float32)
        expected = pair.sdk.extract(data, outputs=["lm_last_token"], normalize=True)["lm_last_token"][0]
        assert_batched_close(floats, expected, f"image {index}")  # one batch here, alone over gRPC
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(embeddings["base64"][index]), "<f4"), floats)
        for kind, values in compact(floats).items():
            assert embeddings[kind][index] == values, kind
        assert len(embeddings["ubinary"][index]) == -(-len(floats) // 8)
    assert body["images"] == [
        {"width": 56 + 28 * seed, "height": 56, "format": "png", "bit_depth": 8} for seed in range(3)
    ]
    assert body["texts"] == []
    assert body["meta"]["billed_units"]["images"] == 3
    assert body["meta"]["api_version"] == {"version": "2"}


def test_one_image_equals_grpc_bit_for_bit(pair: Pair, http: httpx.Client) -> None:
    data = image_png(seed=9)
    body = embed(http, {"images": [data_url(data)], "input_type": "image"})
    assert list(body["embeddings"]) == ["float"]  # the default type
    expected = pair.sdk.extract(data, outputs=["lm_last_token"], normalize=True)
    np.testing.assert_array_equal(np.asarray(body["embeddings"]["float"][0], np.float32), expected["lm_last_token"][0])
    assert body["meta"]["billed_units"]["input_tokens"] == expected.sequence_length


@pytest.mark.parametrize("input_type", ["search_query", "search_document", "classification", "clustering", None])
def test_texts_on_a_raw_checkpoint_are_sent_as_written(pair: Pair, http: httpx.Client, input_type: str | None) -> None:
    body = embed(http, {"texts": ["a red square"], "input_type": input_type})
    expected = pair.sdk.extract(
        None, prompt="a red square", prompt_format="raw", outputs=["lm_last_token"], normalize=True
    )
    np.testing.assert_array_equal(np.asarray(body["embeddings"]["float"][0], np.float32), expected["lm_last_token"][0])
    assert body["texts"] == ["a red square"]
    assert body["images"] == []


def test_a_retrieval_checkpoint_answers_with_its_recipes_vector(biqwen_pair: Pair) -> None:
    data = image_png(seed=4)
    with httpx.Client(base_url=biqwen_pair.url, timeout=TIMEOUT) as http:
        document = embed(http, {"images": [data_url(data)], "input_type": "search_document", "output_dimension": 16})
        query = embed(http, {"texts": ["find the noise"], "input_type": "search_query"})
        refused = http.post("/v2/embed", json={"texts": ["a passage"], "input_type": "search_document"})
    expected_document = biqwen_pair.sdk.embed_images([data], dimensions=16)
    expected_query = biqwen_pair.sdk.embed_queries(["find the noise"])
    got_document = np.asarray(document["embeddings"]["float"][0], np.float32)
    assert got_document.shape == (16,)
    np.testing.assert_array_equal(got_document, np.asarray(expected_document[0]).reshape(-1))
    np.testing.assert_array_equal(
        np.asarray(query["embeddings"]["float"][0], np.float32), np.asarray(expected_query[0]).reshape(-1)
    )
    assert refused.status_code == 400
    assert "queries only" in refused.json()["message"]


def test_refusals_come_in_cohere_shape(http: httpx.Client) -> None:
    cases = [
        ({"texts": ["x"], "input_type": "image"}, "input_type image goes with images"),
        ({"images": [data_url(image_png(1))], "input_type": "search_query"}, "search_query takes texts"),
        ({"texts": ["x"], "embedding_types": ["int4"]}, "embedding_types.0"),
        ({"texts": ["x"], "images": []}, "exactly one of texts and images"),
        ({"texts": ["x"], "truncate": "END"}, "never cut"),
        ({"texts": ["x"], "inputs": []}, "inputs: Extra inputs are not permitted"),
        ({"images": ["data:image/png;base64,@@@"]}, "images[0] is not valid base64"),
    ]
    for body, message in cases:
        reply = http.post("/v2/embed", json=body)
        assert reply.status_code == 400, body
        shape = reply.json()
        assert set(shape) == {"id", "message"}, shape
        assert message in shape["message"], (body, shape)
