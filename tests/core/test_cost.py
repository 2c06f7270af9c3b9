"""Admission by cost: tokens and result bytes known before the model runs, a per-request cap
checked on the headers (nothing decoded) and again exactly, and server-wide budgets that make new
work wait and are never exceeded."""

from __future__ import annotations

import asyncio
import copy
import struct
import zlib
from dataclasses import replace
from typing import Any

import grpc
import pytest

from qwen25vl_embed import EmbeddingClient, EmbeddingError
from qwen25vl_embed_server.cli.flags import LIMIT_FLAGS
from qwen25vl_embed_server.core.admission.cost import image_patches
from qwen25vl_embed_server.core.admission.limits import Limits
from qwen25vl_embed_server.core.admission.request import EncodedRequest, estimate_request, prepare_request
from qwen25vl_embed_server.core.errors import LimitExceededError
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.output_settings import OutputSettings
from qwen25vl_embed_server.core.scheduling.pipeline import Pipeline, PipelineConfig
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import noise_image, png_bytes, server_config

OUTPUTS = (
    "vision_tokens",
    "projected_tokens",
    "lm_last_hidden",
    "lm_last_token",
    "vision_layer_-1",
    "lm_layer_0",
    "visual_token_lens",
    "image_grid_thw",
)


def header_only_png(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds no pixel data: decoding it fails."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


@pytest.mark.parametrize("max_pixels", [None, 40_000])
def test_the_patch_count_from_the_header_is_the_processors(extractor: Extractor, max_pixels: int | None) -> None:
    processor = copy.deepcopy(extractor.loaded.processor)
    if max_pixels is not None:  # small enough that these images are resized down
        processor.image_processor.size = {**processor.image_processor.size, "longest_edge": max_pixels}
    for width, height in [(28, 28), (300, 200), (57, 301), (640, 90), (13, 40)]:
        prepared = extractor.prepare([noise_image(width, height)], processor=processor)
        assert image_patches(width, height, processor.image_processor) == prepared.num_patches, (width, height)


def test_result_bytes_are_exactly_what_the_result_holds(extractor: Extractor) -> None:
    for dtype in ("float32", "bfloat16"):
        prepared = extractor.prepare(
            [noise_image(84, 56), noise_image(56, 56)],
            plan=extractor.plan(OUTPUTS),
            settings=OutputSettings(dtype=dtype),
        )
        (result,) = extractor.run([prepared])
        assert extractor.result_bytes(prepared) == sum(array.nbytes for array in result.tensors.values())


def test_result_bytes_of_text_requests_and_retrieval_vectors(extractor: Extractor, colqwen: Extractor) -> None:
    """Text requests (no image grid) and the retrieval recipes' vectors are counted exactly too."""
    cases = [
        (
            extractor,
            extractor.prepare(
                [], "a text query", plan=extractor.plan(["lm_last_token", "lm_last_hidden"], has_images=False)
            ),
        ),
        (colqwen, colqwen.prepare([], "a query", prompt_format="query", plan=colqwen.plan((), has_images=False))),
        (colqwen, colqwen.prepare([noise_image(84, 56)], "", prompt_format="document", plan=colqwen.plan(()))),
    ]
    for model, prepared in cases:
        (result,) = model.run([prepared])
        assert model.result_bytes(prepared) == sum(array.nbytes for array in result.tensors.values())


def test_the_estimate_bounds_the_exact_cost(extractor: Extractor) -> None:
    limits = Limits()
    request = EncodedRequest(images=[png_bytes(noise_image(300, 200)), png_bytes(noise_image(56, 84))], prompt="hi")
    plan = extractor.plan(OUTPUTS)
    estimate = estimate_request(extractor, request, limits, plan)
    prepared = prepare_request(extractor, request, limits, plan)
    assert estimate.least_tokens <= prepared.cost <= estimate.tokens
    assert estimate.pixels == 300 * 200 + 56 * 84


def test_a_request_over_the_token_cap_is_refused_from_its_headers(extractor: Extractor) -> None:
    # 4000x3000 declared, no pixel data: refused for its cost, so nothing was decoded.
    request = EncodedRequest(images=[header_only_png(4000, 3000)])
    with pytest.raises(LimitExceededError, match=r"^request costs at least \d+ tokens .*max_request_tokens=5000$"):
        prepare_request(extractor, request, Limits(max_request_tokens=5000), extractor.plan(()))


def test_the_exact_cost_is_checked_after_preprocessing(extractor: Extractor) -> None:
    image = png_bytes(noise_image(56, 56))  # 16 patches, 4 image tokens
    plan = extractor.plan(("lm_last_token",))
    least = estimate_request(extractor, EncodedRequest(images=[image]), Limits(), plan).least_tokens
    with pytest.raises(LimitExceededError, match=r"^request costs \d+ tokens"):  # the prompt pushes it over
        prepare_request(
            extractor, EncodedRequest(images=[image], prompt="x" * 50), Limits(max_request_tokens=least + 10), plan
        )


def test_the_cap_over_grpc_is_invalid_argument_naming_cost_cap_and_flag(extractor: Extractor) -> None:
    base = server_config(limits=Limits(max_request_tokens=2000))
    pipeline = replace(base.service.pipeline, limit_hints=LIMIT_FLAGS)
    config = replace(base, service=replace(base.service, pipeline=pipeline))
    with BackgroundServer(extractor, config) as server, EmbeddingClient(server.address, timeout=30) as client:
        with pytest.raises(EmbeddingError) as caught:
            client.extract(png_bytes(noise_image(700, 700)))
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "request costs at least" in str(caught.value)
        assert "max_request_tokens=2000 (set with --max-request-tokens)" in str(caught.value)
        assert client.extract(png_bytes(noise_image(56, 56))).num_images == 1  # small ones pass


# -- the server-wide budgets (the admission rule itself: test_budget.py) -------------------------


def test_concurrent_requests_never_exceed_the_budgets(extractor: Extractor) -> None:
    """A mix of large and small requests, all at once, against budgets that fit about two large
    ones: every request completes (work waits, none is refused), and no budget is ever exceeded."""
    sizes = [(448, 448), (56, 56), (336, 224), (56, 84), (448, 336), (84, 84)] * 3
    config = PipelineConfig(max_tokens_in_flight=2_500, max_pixels_in_flight=400_000, max_result_bytes=3_000_000)

    async def scenario() -> tuple[list[Any], Pipeline]:
        pipeline = Pipeline(extractor, config)
        try:
            requests = [
                EncodedRequest(images=[png_bytes(noise_image(w, h, seed=i))], outputs=OUTPUTS)
                for i, (w, h) in enumerate(sizes)
            ]
            return list(await asyncio.gather(*(pipeline.run(r) for r in requests))), pipeline
        finally:
            await pipeline.close()

    results, pipeline = asyncio.run(scenario())
    assert len(results) == len(sizes)
    for budget, capacity in [
        (pipeline.tokens, config.max_tokens_in_flight),
        (pipeline.pixels, config.max_pixels_in_flight),
        (pipeline.result_bytes, config.max_result_bytes),
    ]:
        assert capacity is not None, budget.what
        assert 0 < budget.peak <= capacity, budget.what
        assert budget.used == 0, budget.what
    # It was the budgets that held work back: together the requests need far more.
    assert config.max_pixels_in_flight is not None
    assert sum(w * h for w, h in sizes) > 2 * config.max_pixels_in_flight
