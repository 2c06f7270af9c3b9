"""Every capture point, through the real server and SDK, equals transformers' own computation.

References come from a second, independently loaded copy of the checkpoint, driven only through
transformers' public API (processor, get_image_features, visual(output_hidden_states=True),
model.model). fp32 on CPU: equality is exact (through a server whose runs use all of the model's
threads, as the reference does: ``full_width_client``), except after L2 normalisation (1e-6).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from qwen25vl_embed import EmbeddingClient, Embeddings

from ..helpers import assert_batched_close, noise_image, png_bytes

SIZES = {
    "300x200": [(300, 200)],
    "224x448": [(224, 448)],
    "1000x60": [(1000, 60)],
    "28x28": [(28, 28)],
    "two images": [(224, 224), (300, 200)],
    "three images": [(28, 28), (1000, 60), (448, 224)],
}
PROMPT = "What is in the picture?"


class Reference:
    """Outputs computed directly with transformers, no project code involved."""

    def __init__(self, path: Path, dtype: torch.dtype = torch.float32) -> None:
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval()

    @torch.inference_mode()
    def run(self, encoded: list[bytes], prompt: str) -> dict[str, Any]:
        images = [Image.open(io.BytesIO(data)).convert("RGB") for data in encoded]
        content: list[dict[str, str]] = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        inputs = self.processor(text=[text], images=images, return_tensors="pt")
        grid = inputs["image_grid_thw"]
        inner = self.model.model
        projected = torch.cat(inner.get_image_features(inputs["pixel_values"], grid).pooler_output)
        vision = inner.visual(inputs["pixel_values"], grid_thw=grid, output_hidden_states=True)
        lm = inner(**inputs, use_cache=False, output_hidden_states=True)
        image_rows = inputs["input_ids"][0] == self.model.config.image_token_id
        return {
            "inputs": inputs,
            "projected_tokens": projected,
            "vision_tokens": self._image_order(vision.last_hidden_state, grid),
            "vision_blocks": [self._image_order(h, grid) for h in vision.hidden_states[1:]],
            "lm_last_hidden": lm.last_hidden_state,
            "lm_layers": lm.hidden_states[1:-1],  # decoder layer outputs, but the last (normed)
            "lm_image_tokens": lm.last_hidden_state[0][image_rows],
            "positions": image_rows.nonzero().flatten(),
        }

    def _window_index(self, grid: torch.Tensor) -> torch.Tensor:
        """The tower's window permutation of merge units, as described in transformers' vision code."""
        from transformers.vision_utils import get_vision_window_index

        visual = self.model.model.visual
        index, _ = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)
        return index

    def _image_order(self, window_ordered: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Undo the tower's window permutation."""
        unit = self.model.model.visual.spatial_merge_size**2
        grouped = window_ordered.reshape(-1, unit, window_ordered.shape[-1])
        return grouped[torch.argsort(self._window_index(grid))].reshape(window_ordered.shape)

    def window_order(self, image_ordered: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Vision tokens in image order put back in the tower's window order."""
        unit = self.model.model.visual.spatial_merge_size**2
        grouped = image_ordered.reshape(-1, unit, image_ordered.shape[-1])
        return grouped[self._window_index(grid)].reshape(image_ordered.shape)

    def image_order_of_merged(self, merged: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """The projector's rows (one per merge unit, window order) in image order."""
        return merged[torch.argsort(self._window_index(grid))]


@pytest.fixture(scope="module")
def reference(tiny_model_path: Path) -> Reference:
    return Reference(tiny_model_path)


ALL_OUTPUTS = [
    "vision_tokens",
    "projected_tokens",
    "lm_last_hidden",
    "lm_image_tokens",
    "vision_pooled_mean",
    "projected_pooled_mean",
    "lm_pooled_mean",
    "lm_image_pooled_mean",
    "lm_last_token",
    "visual_token_lens",
    "image_grid_thw",
    "lm_layer_0",
    "vision_layer_0",
    "vision_layer_2",
    "vision_layer_-1",
]


def _same(actual: np.ndarray, expected: torch.Tensor) -> None:
    assert actual.shape == tuple(expected.shape)
    np.testing.assert_array_equal(actual, expected.numpy())


@pytest.mark.parametrize("sizes", list(SIZES.values()), ids=list(SIZES))
def test_every_capture_point_matches_transformers(
    full_width_client: EmbeddingClient, reference: Reference, sizes: list[tuple[int, int]]
) -> None:
    encoded = [png_bytes(noise_image(w, h, seed=i)) for i, (w, h) in enumerate(sizes)]
    result = full_width_client.extract(encoded, prompt=PROMPT, outputs=ALL_OUTPUTS)
    ref = reference.run(encoded, PROMPT)
    grid = ref["inputs"]["image_grid_thw"]

    _same(result["projected_tokens"], ref["projected_tokens"])
    _same(result["vision_tokens"], ref["vision_tokens"])
    _same(result["lm_last_hidden"], ref["lm_last_hidden"])
    _same(result["lm_image_tokens"], ref["lm_image_tokens"])
    _same(result["lm_layer_0"], ref["lm_layers"][0])
    _same(result["vision_layer_0"], ref["vision_blocks"][0])
    _same(result["vision_layer_2"], ref["vision_blocks"][2])
    _same(result["vision_layer_-1"], ref["vision_tokens"])
    # The projector applied to our pre-projector tokens gives the model's projected tokens: the same
    # matmuls on the same rows, in the window order the model runs them in (a matmul over the rows
    # in another order may sum them otherwise: MKL's AVX2 kernels do).
    with torch.inference_mode():
        window_ordered = reference.window_order(torch.from_numpy(result["vision_tokens"].copy()), grid)
        merged = reference.model.model.visual.merger(window_ordered)
    _same(result["projected_tokens"], reference.image_order_of_merged(merged, grid))

    _same(result["vision_pooled_mean"], ref["vision_tokens"].mean(0, keepdim=True))
    _same(result["projected_pooled_mean"], ref["projected_tokens"].mean(0, keepdim=True))
    _same(result["lm_pooled_mean"], ref["lm_last_hidden"][0].mean(0, keepdim=True))
    _same(result["lm_image_pooled_mean"], ref["lm_image_tokens"].mean(0, keepdim=True))
    _same(result["lm_last_token"], ref["lm_last_hidden"][0, -1:])

    lens = grid.prod(-1) // 4
    _same(result["visual_token_lens"], lens)
    _same(result.visual_token_lens, lens)
    _same(result["image_grid_thw"], grid)
    _same(result.image_grid_thw, grid)
    _same(result.image_token_positions, ref["positions"])
    assert result.sequence_length == ref["inputs"]["input_ids"].shape[1]


def test_several_attention_windows_are_exercised(reference: Reference) -> None:
    """A 224 px image spans several 112 px windows, so window order != image order."""
    encoded = [png_bytes(noise_image(224, 224))]
    ref = reference.run(encoded, PROMPT)
    with torch.inference_mode():
        window_ordered = reference.model.model.visual(
            ref["inputs"]["pixel_values"], grid_thw=ref["inputs"]["image_grid_thw"]
        ).last_hidden_state
    assert not torch.equal(window_ordered, ref["vision_tokens"])


def test_split_by_image_matches_single_image_requests(client: EmbeddingClient) -> None:
    """Splitting a multi-image result gives each image's rows; vision rows equal a solo request."""
    encoded = [png_bytes(noise_image(224, 224, seed=1)), png_bytes(noise_image(300, 200, seed=2))]
    together = client.extract(encoded, outputs=["vision_tokens", "projected_tokens", "lm_image_tokens"])
    parts = together.split_by_image()
    assert len(parts) == 2
    for part, data in zip(parts, encoded, strict=False):
        alone = client.extract(data, outputs=["vision_tokens", "projected_tokens"])
        # The vision tower attends within each image only: per-image rows are identical.
        assert_batched_close(part["vision_tokens"], alone["vision_tokens"], "vision_tokens")
        assert_batched_close(part["projected_tokens"], alone["projected_tokens"], "projected_tokens")
        assert part["lm_image_tokens"].shape[0] == int(part.visual_token_lens[0])


def test_normalize_gives_unit_pooled_vectors(client: EmbeddingClient) -> None:
    encoded = png_bytes(noise_image(300, 200))
    raw = client.extract(encoded)
    unit = client.extract(encoded, normalize=True)
    for name in [
        "vision_pooled_mean",
        "projected_pooled_mean",
        "lm_pooled_mean",
        "lm_image_pooled_mean",
        "lm_last_token",
    ]:
        norm = np.linalg.norm(raw[name], axis=-1, keepdims=True)
        np.testing.assert_allclose(unit[name], raw[name] / norm, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.linalg.norm(unit[name]), 1.0, rtol=1e-6)


def test_default_outputs_are_the_pooled_vectors_and_lens(client: EmbeddingClient) -> None:
    result: Embeddings = client.extract(png_bytes(noise_image(64, 64)))
    assert set(result.names) == {
        "vision_pooled_mean",
        "projected_pooled_mean",
        "lm_pooled_mean",
        "lm_image_pooled_mean",
        "lm_last_token",
        "visual_token_lens",
    }


def test_default_prompt_is_describe_the_image(full_width_client: EmbeddingClient, reference: Reference) -> None:
    encoded = [png_bytes(noise_image(120, 90))]
    result = full_width_client.extract(encoded[0], outputs=["lm_last_hidden"])
    _same(result["lm_last_hidden"], reference.run(encoded, "Describe the image.")["lm_last_hidden"])
