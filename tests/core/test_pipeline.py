"""The transport-neutral pipeline: preprocessing on worker threads, exact and thread-safe."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from qwen25vl_embed_server.core.admission.limits import Limits
from qwen25vl_embed_server.core.admission.request import EncodedRequest, prepare_request
from qwen25vl_embed_server.core.errors import LimitExceededError
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.scheduling.pipeline import Pipeline, PipelineConfig

from ..helpers import assert_batched_close, noise_image, png_bytes


def _requests(count: int) -> list[EncodedRequest]:
    """Different sizes and prompts (some long), so that a shared tokenizer would be exercised."""
    sizes = [(56, 56), (300, 200), (224, 448), (112, 84)]
    return [
        EncodedRequest(
            images=[png_bytes(noise_image(*sizes[i % len(sizes)], seed=i))],
            prompt=f"request {i}: " + "describe every detail " * (i % 7),
            outputs=("lm_last_token", "projected_tokens"),
        )
        for i in range(count)
    ]


def test_concurrent_preprocessing_equals_serial_preprocessing(extractor: Extractor) -> None:
    """Four worker threads preparing 48 requests at once give exactly the serial inputs."""
    requests = _requests(48)
    serial = [prepare_request(extractor, request, Limits()) for request in requests]

    async def scenario() -> list[dict[str, torch.Tensor]]:
        pipeline = Pipeline(extractor, PipelineConfig(preprocess_workers=4))
        try:
            prepared = await asyncio.gather(*(pipeline.prepare(request) for request in requests))
            return [item.inputs for item in prepared]
        finally:
            await pipeline.close()

    for got, expected in zip(asyncio.run(scenario()), serial, strict=True):
        assert got.keys() == expected.inputs.keys()
        for key, value in expected.inputs.items():
            assert torch.equal(got[key], value), key


def test_each_worker_tokenizes_with_a_processor_of_its_own(extractor: Extractor) -> None:
    seen: set[int] = set()

    async def scenario() -> None:
        pipeline = Pipeline(extractor, PipelineConfig(preprocess_workers=3))
        loop = asyncio.get_running_loop()
        barrier = threading.Barrier(3)

        def which() -> int:
            barrier.wait(timeout=30)  # all three threads are up at once
            return id(pipeline._local.processor.tokenizer)

        try:
            seen.update(await asyncio.gather(*(loop.run_in_executor(pipeline._preprocess, which) for _ in range(3))))
        finally:
            await pipeline.close()

    asyncio.run(scenario())
    assert len(seen) == 3
    assert id(extractor.loaded.processor.tokenizer) not in seen


def test_pipeline_results_equal_the_extractor_run_alone(extractor: Extractor) -> None:
    requests = _requests(6)

    async def scenario() -> list[dict[str, object]]:
        pipeline = Pipeline(extractor)
        try:
            results = await asyncio.gather(*(pipeline.run(request) for request in requests))
            return [dict(result.tensors) for result in results]
        finally:
            await pipeline.close()

    for got, request in zip(asyncio.run(scenario()), requests, strict=True):
        alone = extractor.run([prepare_request(extractor, request, Limits())])[0]
        for name, value in alone.tensors.items():
            assert_batched_close(got[name], value, name)  # type: ignore[arg-type]


def test_the_pipeline_adds_its_edge_hint_to_limit_refusals(extractor: Extractor) -> None:
    async def scenario() -> None:
        config = PipelineConfig(limits=Limits(max_prompt_tokens=3), limit_hints={"max_prompt_tokens": "--flag"})
        pipeline = Pipeline(extractor, config)
        try:
            await pipeline.run(EncodedRequest(images=[png_bytes(noise_image(56, 56))], prompt="one two three four"))
        finally:
            await pipeline.close()

    with pytest.raises(LimitExceededError, match=r"tokens; the limit is max_prompt_tokens=3 \(set with --flag\)$"):
        asyncio.run(scenario())
