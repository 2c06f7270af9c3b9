"""``POST /v1/embeddings`` through the official OpenAI client (``base_url=``): texts, and images
in vLLM's chat-style ``messages`` shape; each vector equal to the gRPC service's for the same input."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from openai.types import CreateEmbeddingResponse

from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.http.config import HTTPConfig

from ..helpers import assert_batched_close
from .conftest import TIMEOUT, Pair, image_message, image_png, unit

TEXTS = ["a photo of a cat", "two dogs on a beach", "ünïcödé text ✓"]


@pytest.fixture(scope="module")
def client(pair: Pair) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{pair.url}/v1", api_key="no-token-needed", timeout=TIMEOUT) as sdk:
        yield sdk


def served_model(extractor: Extractor) -> str:
    return extractor.info().model


def grpc_text(pair: Pair, text: str) -> tuple[np.ndarray, int]:
    """The gRPC service's vector of a text sent as written (raw format), L2-normalised, and T."""
    result = pair.sdk.extract(None, prompt=text, prompt_format="raw", outputs=["lm_last_token"], normalize=True)
    return np.asarray(result["lm_last_token"][0]), result.sequence_length


def grpc_image(pair: Pair, data: bytes, prompt: str | None = None) -> np.ndarray:
    result = pair.sdk.extract(data, prompt=prompt, outputs=["lm_last_token"], normalize=True)
    return np.asarray(result["lm_last_token"][0])


def test_one_text_equals_the_grpc_vector_bit_for_bit(pair: Pair, client: openai.OpenAI, extractor: Extractor) -> None:
    response = client.embeddings.create(model=served_model(extractor), input=TEXTS[0])
    (item,) = response.data
    expected, tokens = grpc_text(pair, TEXTS[0])
    got = np.asarray(item.embedding, np.float32)
    # Both requests ran alone on the one lane: the same computation, the same bits.
    np.testing.assert_array_equal(got, expected)
    assert response.model == served_model(extractor)
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens
    # And an independent check of the normalisation: the raw last-token state, normalised here.
    raw = pair.sdk.extract(None, prompt=TEXTS[0], prompt_format="raw", outputs=["lm_last_token"])
    np.testing.assert_allclose(got, unit(raw["lm_last_token"]), rtol=1e-6, atol=1e-7)


def test_a_list_of_texts_in_order_each_equal_to_grpc(pair: Pair, client: openai.OpenAI) -> None:
    response = client.embeddings.create(model="", input=TEXTS)
    assert [item.index for item in response.data] == [0, 1, 2]
    total = 0
    for text, item in zip(TEXTS, response.data, strict=True):
        expected, tokens = grpc_text(pair, text)
        total += tokens
        # The three ran in one batch here and alone over gRPC: equal within batching's rounding.
        assert_batched_close(np.asarray(item.embedding), expected, text)
    assert response.usage.prompt_tokens == total


def test_float_and_base64_encodings_carry_the_same_float32_values(pair: Pair) -> None:
    with httpx.Client(base_url=pair.url, timeout=TIMEOUT) as http:
        floats = http.post("/v1/embeddings", json={"input": TEXTS[1], "encoding_format": "float"})
        packed = http.post("/v1/embeddings", json={"input": TEXTS[1], "encoding_format": "base64"})
    assert floats.status_code == packed.status_code == 200
    as_floats = np.asarray(floats.json()["data"][0]["embedding"], np.float32)
    as_base64 = np.frombuffer(base64.b64decode(packed.json()["data"][0]["embedding"]), "<f4")
    np.testing.assert_array_equal(as_floats, as_base64)
    np.testing.assert_array_equal(as_floats, grpc_text(pair, TEXTS[1])[0])
    body = floats.json()
    assert body["object"] == "list"
    assert body["data"][0]["object"] == "embedding"


@pytest.mark.parametrize("prompt", [None, "What is in this picture?"])
def test_an_image_in_vllms_messages_shape_equals_grpc(pair: Pair, client: openai.OpenAI, prompt: str | None) -> None:
    data = image_png(seed=3, width=84, height=56)
    response = client.post(
        "/embeddings",
        body={"model": "", "messages": image_message(data, prompt), "encoding_format": "float"},
        cast_to=CreateEmbeddingResponse,
    )
    (item,) = response.data
    # No text: the chat format's default prompt, as over gRPC.
    np.testing.assert_array_equal(np.asarray(item.embedding, np.float32), grpc_image(pair, data, prompt))


def test_a_text_only_message_goes_through_the_chat_template(pair: Pair, client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    response = client.post("/embeddings", body={"messages": messages}, cast_to=CreateEmbeddingResponse)
    expected = pair.sdk.extract(None, prompt="hello there", outputs=["lm_last_token"], normalize=True)
    np.testing.assert_array_equal(np.asarray(response.data[0].embedding, np.float32), expected["lm_last_token"][0])


def test_models_lists_the_served_name_and_other_names_are_refused(
    serving_pair: object, extractor: Extractor, client: openai.OpenAI
) -> None:
    listed = client.models.list()
    assert [model.id for model in listed.data] == [served_model(extractor)]
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    with (
        serving_pair(extractor, HTTPConfig(served_model_name="tiny-vl")) as named,  # type: ignore[operator]
        openai.OpenAI(base_url=f"{named.url}/v1", api_key="x", timeout=TIMEOUT) as sdk,
    ):
        assert [model.id for model in sdk.models.list().data] == ["tiny-vl"]
        response = sdk.embeddings.create(model="tiny-vl", input=TEXTS[0])
        assert response.model == "tiny-vl"
        np.testing.assert_array_equal(np.asarray(response.data[0].embedding, np.float32), grpc_text(named, TEXTS[0])[0])


def test_http_vector_picks_the_pooled_output_of_a_raw_checkpoint(serving_pair: object, extractor: Extractor) -> None:
    data = image_png(seed=5)
    with serving_pair(extractor, HTTPConfig(vector="projected_pooled_mean")) as running:  # type: ignore[operator]
        with httpx.Client(base_url=running.url, timeout=TIMEOUT) as http:
            reply = http.post("/v1/embeddings", json={"messages": image_message(data)})
        expected = running.sdk.extract(data, outputs=["projected_pooled_mean"], normalize=True)
    assert reply.status_code == 200, reply.text
    np.testing.assert_array_equal(
        np.asarray(reply.json()["data"][0]["embedding"], np.float32), expected["projected_pooled_mean"][0]
    )


def test_dimensions_on_a_raw_checkpoint_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="no retrieval recipe"):
        client.embeddings.create(model="", input="x", dimensions=16)


def test_more_inputs_than_the_server_admits_at_once_are_served_in_turn(
    serving_pair: object, extractor: Extractor
) -> None:
    texts = [f"text number {k}" for k in range(5)]
    with (
        serving_pair(extractor, HTTPConfig(max_inputs=8), max_in_flight=2) as small,  # type: ignore[operator]
        httpx.Client(base_url=small.url, timeout=TIMEOUT) as http,
    ):
        reply = http.post("/v1/embeddings", json={"input": texts, "encoding_format": "float"})
        assert reply.status_code == 200, reply.text
        for text, item in zip(texts, reply.json()["data"], strict=True):
            assert_batched_close(np.asarray(item["embedding"]), grpc_text(small, text)[0], text)
