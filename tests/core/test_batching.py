"""A batch of requests gives each request its unbatched result (fp32 CPU, 1e-5 relative)."""

from __future__ import annotations

import numpy as np
import torch

from qwen25vl_embed_server.core.model.extractor import MAX_PADDING, Extractor, Prepared, similar_lengths
from qwen25vl_embed_server.core.model.output_settings import OutputSettings

from ..helpers import assert_batched_close, noise_image

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
            OutputSettings(normalize=True),
        ),
        extractor.prepare([noise_image(1000, 60, 5)], "Short.", extractor.plan([]), OutputSettings(dtype="bfloat16")),
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


def test_similar_lengths_bound_the_padding_of_every_group() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = [int(n) for n in rng.integers(1, 4000, size=int(rng.integers(1, 12)))]
        indices = list(range(len(lengths)))
        groups = similar_lengths(indices, lengths)
        assert sorted(i for group in groups for i in group) == indices
        for group in groups:
            assert group == sorted(group)
            real = sum(lengths[i] for i in group)
            assert max(lengths[i] for i in group) * len(group) <= (1 + MAX_PADDING) * real
    assert similar_lengths([0, 1, 2, 3], [300, 3000, 310, 2900]) == [[0, 2], [1, 3]]
    assert similar_lengths([5], [10, 10, 10, 10, 10, 7]) == [[5]]


def test_the_lm_runs_similar_lengths_together_and_far_ones_apart(extractor: Extractor) -> None:
    """Two near lengths share one padded forward; a much longer one runs apart; all equal alone."""
    shapes: list[tuple[int, ...]] = []

    def record(_module: object, _args: object, kwargs: dict[str, torch.Tensor]) -> None:
        shapes.append(tuple(kwargs["inputs_embeds"].shape[:2]))

    plan = extractor.plan(["lm_last_hidden", "lm_last_token"])
    batch = [
        extractor.prepare([noise_image(224, 224, 1)], "Same prompt.", plan),
        extractor.prepare([noise_image(896, 896, 2)], "Same prompt.", plan),
        extractor.prepare([noise_image(224, 196, 3)], "Same prompt.", plan),
    ]
    lengths = [item.sequence_length for item in batch]
    assert lengths[2] < lengths[0] < lengths[1]
    hook = extractor.loaded.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        together = extractor.run(batch)
    finally:
        hook.remove()
    assert sorted(shapes) == sorted([(2, lengths[0]), (1, lengths[1])])
    for item, result in zip(batch, together, strict=True):
        alone = extractor.run([item])[0]
        for name, array in alone.tensors.items():
            assert_batched_close(result.tensors[name], array, name)


def test_on_the_cpu_a_batch_holds_at_most_the_cpu_bound_of_tokens(extractor: Extractor) -> None:
    """Larger batches run slower per image on a CPU: by default a CPU batch stops at 6,144 tokens;
    a bound given explicitly is the bound."""
    import asyncio
    from dataclasses import replace

    from qwen25vl_embed_server.core.scheduling.batcher import CPU_BATCH_TOKENS, Batcher, BatchingConfig

    assert BatchingConfig().tokens_for("cpu") == CPU_BATCH_TOKENS == 6144
    assert BatchingConfig().tokens_for("cuda") == BatchingConfig().tokens_for("mps") == 32768
    assert BatchingConfig(max_tokens=100).tokens_for("cpu") == 100
    items = [
        extractor.prepare([noise_image(448, 448, seed)], "Describe the image.", extractor.plan(["lm_last_token"]))
        for seed in range(10)
    ]
    cost = items[0].cost
    assert all(item.cost == cost for item in items)
    assert CPU_BATCH_TOKENS // cost in (2, 3, 4)

    class Sizes:
        def __init__(self) -> None:
            self.images: list[int] = []

        def batch_ran(self, requests: int, images: int, seconds: float) -> None:
            self.images.append(images)

    def batches(config: BatchingConfig) -> list[int]:
        sizes = Sizes()

        async def scenario() -> None:
            batcher = Batcher(extractor, replace(config, lanes=1), observer=sizes)  # one lane: its bound alone
            try:
                assert batcher.max_tokens == config.tokens_for("cpu")
                await asyncio.gather(*(batcher.submit(item) for item in items))  # all queued at once
            finally:
                await batcher.close()

        asyncio.run(scenario())
        return sizes.images

    per_batch = CPU_BATCH_TOKENS // cost
    expected = [per_batch] * (len(items) // per_batch) + ([len(items) % per_batch] if len(items) % per_batch else [])
    assert batches(BatchingConfig()) == expected
    assert batches(BatchingConfig(max_tokens=32768)) == [len(items)]
