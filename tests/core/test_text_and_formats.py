"""Text requests (no image) and the raw prompt format, through the real server and SDK, against
transformers computing the same text alone (fp32 on CPU: exact at the reference's thread count,
through ``full_width_client``; batched: within 1e-5)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from qwen25vl_embed import EmbeddingClient, EmbeddingError
from qwen25vl_embed_server.core.errors import InvalidInputError
from qwen25vl_embed_server.core.model.extractor import Extractor

from ..helpers import assert_batched_close, noise_image, png_bytes

LM_OUTPUTS = ["lm_last_hidden", "lm_last_token", "lm_pooled_mean", "lm_layer_0"]
VISION_SPAN = "<|vision_start|><|image_pad|><|vision_end|>"


class TextReference:
    """transformers alone: the processor on a whole text, model.model's hidden states."""

    def __init__(self, path: Path) -> None:
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()

    def chat_text(self, prompt: str) -> str:
        messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        text: str = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text

    @torch.inference_mode()
    def run(self, text: str, images: list[bytes] = ()) -> dict[str, Any]:  # type: ignore[assignment]
        decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
        inputs = self.processor(text=[text], images=decoded or None, return_tensors="pt")
        out = self.model.model(**inputs, use_cache=False, output_hidden_states=True)
        hidden = out.last_hidden_state
        return {
            "lm_last_hidden": hidden.numpy(),
            "lm_last_token": hidden[0, -1:].numpy(),
            "lm_pooled_mean": hidden[0].mean(0, keepdim=True).numpy(),
            "lm_layer_0": out.hidden_states[1].numpy(),
            "length": int(inputs["input_ids"].shape[1]),
        }


@pytest.fixture(scope="module")
def reference(tiny_model_path: Path) -> TextReference:
    return TextReference(tiny_model_path)


def test_text_request_equals_transformers_on_the_prompt_alone(
    full_width_client: EmbeddingClient, reference: TextReference
) -> None:
    prompt = "a red bicycle leaning on a wall"
    result = full_width_client.extract(None, prompt, outputs=LM_OUTPUTS)
    expected = reference.run(reference.chat_text(prompt))
    for name in LM_OUTPUTS:
        np.testing.assert_array_equal(result[name], expected[name], err_msg=name)
    assert result.sequence_length == expected["length"]
    assert result.visual_token_lens.shape == (0,)
    assert result.image_token_positions.shape == (0,)


def test_text_request_defaults_to_the_lm_vectors(client: EmbeddingClient) -> None:
    assert set(client.extract(None, "hello").tensors) == {"lm_pooled_mean", "lm_last_token"}


def test_text_request_asking_for_vision_outputs_is_invalid_argument_naming_them(client: EmbeddingClient) -> None:
    with pytest.raises(EmbeddingError) as raised:
        client.extract(None, "hello", outputs=["lm_last_token", "projected_tokens", "vision_layer_0"])
    assert raised.value.code.name == "INVALID_ARGUMENT"
    assert "no projected_tokens, vision_layer_0" in raised.value.details


def test_neither_image_nor_prompt_is_refused_before_sending(client: EmbeddingClient) -> None:
    with pytest.raises(ValueError, match="an image or a prompt"):
        client.extract(None)


def test_text_requests_batched_beside_image_requests(extractor: Extractor, reference: TextReference) -> None:
    image = noise_image(224, 168, seed=3)
    texts = ["short", "a somewhat longer query about a landscape with mountains"]
    with_image = extractor.prepare([image], "What is it?", extractor.plan(["lm_last_hidden", "projected_tokens"]))
    text_plan = extractor.plan(["lm_last_hidden", "lm_last_token"], has_images=False)
    text_items = [extractor.prepare([], text, text_plan) for text in texts]
    batch = extractor.run([text_items[0], with_image, text_items[1]])
    alone = [extractor.run([item])[0] for item in (text_items[0], with_image, text_items[1])]
    for batched, single in zip(batch, alone, strict=True):
        for name, value in single.tensors.items():
            assert_batched_close(batched.tensors[name], value, name)
    for index, text in ((0, texts[0]), (2, texts[1])):
        np.testing.assert_array_equal(
            alone[index].tensors["lm_last_hidden"], reference.run(reference.chat_text(text))["lm_last_hidden"]
        )


def test_raw_format_places_each_image_at_its_placeholder(
    full_width_client: EmbeddingClient, reference: TextReference
) -> None:
    images = [png_bytes(noise_image(224, 112, seed=1)), png_bytes(noise_image(112, 112, seed=2))]
    raw = "<|im_start|>user\nFirst <image> then <image>: compare.<|im_end|><|endoftext|>"
    result = full_width_client.extract(images, raw, outputs=["lm_last_hidden", "lm_image_tokens"], prompt_format="raw")
    expected = reference.run(raw.replace("<image>", VISION_SPAN), images)
    np.testing.assert_array_equal(result["lm_last_hidden"], expected["lm_last_hidden"])
    assert result.sequence_length == expected["length"]
    assert result.visual_token_lens.tolist() == [32, 16]


def test_raw_format_without_images_is_the_text_as_written(
    full_width_client: EmbeddingClient, reference: TextReference
) -> None:
    raw = "Query: where is the cat?" + "<|endoftext|>" * 10
    result = full_width_client.extract(None, raw, outputs=["lm_last_hidden"], prompt_format="raw")
    np.testing.assert_array_equal(result["lm_last_hidden"], reference.run(raw)["lm_last_hidden"])


@pytest.mark.parametrize(
    ("images", "prompt", "message"),
    [
        (1, "no placeholder here", "has 0 image placeholder(s) <image> but the request has 1 image(s)"),
        (0, "<image> twice <image>", "has 2 image placeholder(s) <image> but the request has 0 image(s)"),
        (1, f"<image>{VISION_SPAN}", "the prompt contains <|image_pad|>, which is reserved"),
    ],
    ids=["too few placeholders", "too many placeholders", "reserved token"],
)
def test_raw_format_refusals(client: EmbeddingClient, images: int, prompt: str, message: str) -> None:
    encoded = [png_bytes(noise_image(56, 56))] * images
    with pytest.raises(EmbeddingError) as raised:
        client.extract(encoded or None, prompt, outputs=["lm_last_token"], prompt_format="raw")
    assert raised.value.code.name == "INVALID_ARGUMENT"
    assert message in raised.value.details


def test_query_and_document_formats_need_a_recipe(client: EmbeddingClient, extractor: Extractor) -> None:
    with pytest.raises(EmbeddingError, match="needs a retrieval recipe; this server has none"):
        client.extract(None, "a query", prompt_format="query")
    with pytest.raises(InvalidInputError, match="no retrieval recipe"):
        extractor.plan(["multi_vector"])
