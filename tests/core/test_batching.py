"""A batch of requests gives each request its unbatched result (fp32 CPU, 1e-5 relative)."""

from __future__ import annotations

import numpy as np

from qwen25vl_embed_server.core.extractor import Extractor, Prepared

from ..helpers import noise_image

ALL = [
    "vision_tokens",
    "projected_tokens",
    "lm_last_hidden",
    "lm_image_tokens",
    "lm_layer_0",
    "vision_layer_1",
    "vision_pooled_mean",
    "projected_pooled_mean",
    "lm_pooled_mean",
    "lm_image_pooled_mean",
    "lm_last_token",
    "visual_token_lens",
    "image_grid_thw",
]


def _requests(extractor: Extractor) -> list[Prepared]:
    """Mixed sizes, prompts, image counts and output sets, vision-only beside LM requests."""
    return [
        extractor.prepare([noise_image(224, 224, 1)], "Describe the image.", extractor.plan(ALL)),
        extractor.prepare([noise_image(300, 200, 2)], "", extractor.plan(["vision_tokens", "projected_pooled_mean"])),
        extractor.prepare(
            [noise_image(28, 28, 3), noise_image(448, 112, 4)],
            "A much longer prompt that makes this sequence the longest of the batch by a margin.",
            extractor.plan(["lm_last_token", "lm_layer_-1", "projected_tokens"]),
            normalize=True,
        ),
        extractor.prepare([noise_image(1000, 60, 5)], "Short.", extractor.plan([]), dtype="bfloat16"),
        extractor.prepare([noise_image(140, 140, 6)], "x", extractor.plan(["vision_layer_-1", "vision_pooled_mean"])),
    ]


def test_batched_results_equal_unbatched(extractor: Extractor) -> None:
    batch = _requests(extractor)
    together = extractor.run(batch)
    for item, result in zip(batch, together, strict=True):
        alone = extractor.run([item])[0]
        assert list(result.tensors) == list(item.plan.names)
        for name, array in alone.tensors.items():
            assert result.tensors[name].dtype == array.dtype, name
            np.testing.assert_allclose(
                result.tensors[name].astype(np.float64), array.astype(np.float64), rtol=1e-5, atol=1e-5, err_msg=name
            )
        np.testing.assert_array_equal(result.image_token_positions, alone.image_token_positions)
        np.testing.assert_array_equal(result.image_grid_thw, alone.image_grid_thw)
        assert result.sequence_length == alone.sequence_length
