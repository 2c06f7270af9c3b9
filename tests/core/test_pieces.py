"""A large request runs in pieces (vision a few images at a time, then the LM), with small requests
let through between them, and its result equals the request run whole.

Fidelity: every output of a split request, per-layer captures included, equals the request run in
one forward and transformers' own computation (within 1e-5 relative; in fp32 on the CPU it is
bit-exact here). Fairness: the order of the vision tower's forwards (recorded by
:class:`~tests.rpc.test_faults.ModelProbe`) and of the results shows a small request's batch run
between two pieces of a large one; no clock decides a test.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwen25vl_embed import EmbeddingClient
from qwen25vl_embed_server.core.errors import DeadlineExceededError
from qwen25vl_embed_server.core.fixtures.tiny_retrieval import build_tiny_retrieval
from qwen25vl_embed_server.core.model.extractor import Extractor, Prepared
from qwen25vl_embed_server.core.model.finishing import Extraction
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model
from qwen25vl_embed_server.core.model.output_settings import OutputSettings
from qwen25vl_embed_server.core.scheduling.batcher import Batcher, BatchingConfig
from qwen25vl_embed_server.core.scheduling.pieces import image_groups
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import assert_batched_close, noise_image, png_bytes
from ..rpc.test_faults import CALL_TIMEOUT, ModelProbe, grid
from .test_fidelity import ALL_OUTPUTS, PROMPT, Reference

# Three images of several 112 px attention windows each, multiples of 28 so that each grid is
# known: 128, 192 and 252 patches. SMALL (16 patches) is a small request's image.
A, B, C = (224, 112), (168, 224), (252, 196)
SMALL = (56, 56)
ALONE = (280, 224)  # 320 patches: above a piece of 256 but one piece (one image, no LM)
EVERY_OUTPUT = [*ALL_OUTPUTS, "vision_layer_1", "lm_layer_-1"]  # the last LM layer: compared with the whole run


def _image(size: tuple[int, int]) -> Image.Image:
    return noise_image(*size, seed=size[0] * 1000 + size[1])


def _big(extractor: Extractor, outputs: list[str] = EVERY_OUTPUT) -> Prepared:
    return extractor.prepare([_image(A), _image(B), _image(C)], PROMPT, extractor.plan(outputs))


def _small(extractor: Extractor) -> Prepared:
    return extractor.prepare([_image(SMALL)], PROMPT, extractor.plan(["lm_last_token"]))


def _in_pieces(extractor: Extractor, item: Prepared, max_piece_tokens: int) -> Extraction:
    run = extractor.run_in_pieces(item, max_piece_tokens)
    results = [run.step() for _ in range(run.pieces)]
    assert all(result is None for result in results[:-1])
    assert results[-1] is not None
    return results[-1]


def _assert_same(split: Extraction, whole: Extraction) -> None:
    assert list(split.tensors) == list(whole.tensors)
    for name, expected in whole.tensors.items():
        assert split.tensors[name].dtype == expected.dtype, name
        assert split.tensors[name].shape == expected.shape, name
        assert_batched_close(split.tensors[name], expected, name)
    np.testing.assert_array_equal(split.image_token_positions, whole.image_token_positions)
    np.testing.assert_array_equal(split.image_grid_thw, whole.image_grid_thw)
    np.testing.assert_array_equal(split.visual_token_lens, whole.visual_token_lens)
    assert split.sequence_length == whole.sequence_length


def test_images_are_grouped_up_to_the_piece_size() -> None:
    assert image_groups([128, 192, 252], 256) == [(0, 1), (1, 2), (2, 3)]
    assert image_groups([128, 192, 252], 400) == [(0, 2), (2, 3)]
    assert image_groups([128, 192, 252], 100) == [(0, 1), (1, 2), (2, 3)]  # an image is never cut
    assert image_groups([128, 192, 252], 10_000) == [(0, 3)]
    assert image_groups([], 256) == []


@pytest.mark.parametrize(
    ("outputs", "max_piece_tokens", "pieces"),
    [
        (EVERY_OUTPUT, 1, 4),  # each image alone (all larger than a piece), then the LM
        (EVERY_OUTPUT, 400, 3),  # A and B together, C, the LM
        (["vision_tokens", "vision_layer_0", "vision_layer_-1", "projected_pooled_mean"], 256, 3),  # no LM piece
    ],
    ids=["per-image", "grouped", "vision-only"],
)
def test_a_split_request_equals_it_run_whole(
    extractor: Extractor, outputs: list[str], max_piece_tokens: int, pieces: int
) -> None:
    item = _big(extractor, outputs)
    assert extractor.pieces(item, max_piece_tokens) == pieces
    assert extractor.pieces(item, 0) == 1  # 0: never split
    assert extractor.pieces(item, item.cost) == 1  # within the piece size: whole
    _assert_same(_in_pieces(extractor, item, max_piece_tokens), extractor.run([item])[0])


@pytest.fixture(scope="module")
def reference(tiny_model_path: Path) -> Reference:
    return Reference(tiny_model_path)


def test_a_split_request_through_the_server_equals_transformers(
    extractor: Extractor, tiny_server: Callable[..., BackgroundServer], reference: Reference
) -> None:
    """The whole path (SDK, gRPC, pipeline, batcher) runs it in pieces; every capture point equals
    transformers' computation of the request in one forward."""
    encoded = [png_bytes(_image(size)) for size in (A, B, C)]
    with (
        tiny_server(batching=BatchingConfig(max_piece_tokens=400)) as server,
        EmbeddingClient(server.address, timeout=CALL_TIMEOUT) as sdk,
        ModelProbe(extractor) as probe,
    ):
        result = sdk.extract(encoded, prompt=PROMPT, outputs=EVERY_OUTPUT)
    assert probe.forwards == [[grid(A), grid(B)], [grid(C)]]  # two vision pieces
    ref = reference.run(encoded, PROMPT)
    expected = {
        "projected_tokens": ref["projected_tokens"],
        "vision_tokens": ref["vision_tokens"],
        "vision_layer_0": ref["vision_blocks"][0],
        "vision_layer_1": ref["vision_blocks"][1],
        "vision_layer_2": ref["vision_blocks"][2],
        "vision_layer_-1": ref["vision_tokens"],
        "lm_last_hidden": ref["lm_last_hidden"],
        "lm_image_tokens": ref["lm_image_tokens"],
        "lm_layer_0": ref["lm_layers"][0],
        "vision_pooled_mean": ref["vision_tokens"].mean(0, keepdim=True),
        "projected_pooled_mean": ref["projected_tokens"].mean(0, keepdim=True),
        "lm_pooled_mean": ref["lm_last_hidden"][0].mean(0, keepdim=True),
        "lm_image_pooled_mean": ref["lm_image_tokens"].mean(0, keepdim=True),
        "lm_last_token": ref["lm_last_hidden"][0, -1:],
    }
    for name, tensor in expected.items():
        assert result[name].shape == tuple(tensor.shape), name
        assert_batched_close(result[name], tensor.numpy(), name)
    np.testing.assert_array_equal(result.image_token_positions, ref["positions"].numpy())
    np.testing.assert_array_equal(result["image_grid_thw"], ref["inputs"]["image_grid_thw"].numpy())


@pytest.fixture(scope="module")
def biqwen(tmp_path_factory: pytest.TempPathFactory) -> Extractor:
    path = build_tiny_retrieval(tmp_path_factory.mktemp("biqwen-pieces"), "biqwen2.5")
    return Extractor(load_model(LoadOptions(model=str(path), device="cpu", dtype="float32")))


@pytest.mark.parametrize("recipe", ["colqwen", "biqwen"])
def test_retrieval_vectors_of_a_split_request_equal_it_run_whole(
    recipe: str, colqwen: Extractor, biqwen: Extractor
) -> None:
    extractor = colqwen if recipe == "colqwen" else biqwen
    plan = extractor.plan([*extractor.info().default_outputs, "lm_last_token"])
    item = extractor.prepare([_image(C)], "", plan, OutputSettings(dimensions=64), prompt_format="document")
    assert extractor.pieces(item, 1) == 2  # the vision tower, then the LM and the recipe's head
    _assert_same(_in_pieces(extractor, item, 1), extractor.run([item])[0])


@pytest.mark.parametrize("split", [True, False], ids=["in-pieces", "whole"])
def test_a_small_request_queued_behind_a_large_one_runs_between_its_pieces(extractor: Extractor, split: bool) -> None:
    """All are queued before the first batch forms, the large one first, then a small one, then a
    large one that is a single piece. Split, the small one runs after the large one's first piece
    and its result comes first, and the single-piece one waits for the large one (it is not
    small); whole (the control), all join one batch and the small one waits for all of it."""
    big, small = _big(extractor), _small(extractor)
    alone = extractor.prepare([_image(ALONE)], PROMPT, extractor.plan(["projected_pooled_mean"]))
    assert alone.cost > 256
    assert extractor.pieces(alone, 256) == 1

    async def scenario(probe: ModelProbe) -> list[str]:
        batcher = Batcher(extractor, BatchingConfig(max_wait_ms=1, max_piece_tokens=256 if split else 0, lanes=1))
        done: list[str] = []

        async def one(name: str, item: Prepared) -> None:
            await asyncio.wait_for(batcher.submit(item), CALL_TIMEOUT)
            done.append(name)

        try:
            await asyncio.gather(one("big", big), one("small", small), one("alone", alone))
        finally:
            await batcher.close()
        return done

    with ModelProbe(extractor) as probe:
        done = asyncio.run(scenario(probe))
    if split:
        assert probe.forwards == [[grid(A)], [grid(SMALL)], [grid(B)], [grid(C)], [grid(ALONE)]]
        assert done == ["small", "big", "alone"]
    else:  # one batch (its vision-only request first; LM forwards by length, the short one first):
        # the small one's result waits for all of the large one
        assert probe.forwards == [[grid(ALONE)], [grid(SMALL)], [grid(A), grid(B), grid(C)]]
        assert sorted(done) == ["alone", "big", "small"]


def test_a_small_request_arriving_while_a_large_one_runs_goes_next(extractor: Extractor) -> None:
    """The large request's first piece is held in the model until the small request is queued;
    the small request then runs before the large request's second piece."""
    big, small = _big(extractor), _small(extractor)

    async def scenario(probe: ModelProbe) -> list[str]:
        batcher = Batcher(extractor, BatchingConfig(max_wait_ms=1, max_piece_tokens=256))
        done: list[str] = []

        async def one(name: str, item: Prepared) -> None:
            await asyncio.wait_for(batcher.submit(item), CALL_TIMEOUT)
            done.append(name)

        try:
            large = asyncio.ensure_future(one("big", big))
            assert await asyncio.to_thread(probe.holding.wait, CALL_TIMEOUT)  # the first piece runs
            late = asyncio.ensure_future(one("small", small))
            while batcher.queue_depth == 0:  # until the small request is queued (no clock involved)
                await asyncio.sleep(0)
            probe.release()
            await asyncio.gather(large, late)
        finally:
            await batcher.close()
        return done

    with ModelProbe(extractor, hold=A) as probe:
        done = asyncio.run(scenario(probe))
    assert probe.forwards == [[grid(A)], [grid(SMALL)], [grid(B)], [grid(C)]]
    assert done == ["small", "big"]


def test_a_split_request_whose_deadline_passes_stops_at_the_next_piece(extractor: Extractor) -> None:
    """Its caller is gone: the rest of its pieces never run, and the small requests still do."""
    big, small = _big(extractor), _small(extractor)

    async def scenario(probe: ModelProbe) -> None:
        batcher = Batcher(extractor, BatchingConfig(max_wait_ms=1, max_piece_tokens=256))
        try:
            deadline = time.monotonic() + 0.05
            large = asyncio.ensure_future(batcher.submit(big, deadline=deadline))
            assert await asyncio.to_thread(probe.holding.wait, CALL_TIMEOUT)
            while time.monotonic() < deadline:  # the deadline passes while the first piece is held
                await asyncio.sleep(0.01)
            probe.release()
            with pytest.raises(DeadlineExceededError, match="while the request ran"):
                await asyncio.wait_for(large, CALL_TIMEOUT)
            result = await asyncio.wait_for(batcher.submit(small), CALL_TIMEOUT)
            assert "lm_last_token" in result.tensors
        finally:
            await batcher.close()

    with ModelProbe(extractor, hold=A) as probe:
        asyncio.run(scenario(probe))
    assert probe.forwards == [[grid(A)], [grid(SMALL)]]
