"""The model's lanes: batches side by side on one model, each result what it is run alone.

The real tiny model runs every request. Where two runs must overlap, one is held inside its
forward (at the language model's final norm, after every capture hook of its forward has fired)
while the other runs from start to end: a capture hook that heard the other lane's forward would
put the other request's tensors into the held one's result.

A run's bits depend on its width (its thread count) where a kernel splits a sum across threads, as
MKL's AVX2 matmuls do: a lane's result is compared bit for bit with the request run alone at the
width that lane ran, and runs at the two widths are compared within float rounding.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

from qwen25vl_embed_server.core.model.extractor import Extractor, Prepared
from qwen25vl_embed_server.core.model.finishing import Extraction
from qwen25vl_embed_server.core.scheduling.batcher import Batcher, BatchingConfig
from qwen25vl_embed_server.core.scheduling.model_lanes import ModelLanes
from qwen25vl_embed_server.core.scheduling.model_thread import ModelThread, set_torch_threads

from ..helpers import assert_batched_close, noise_image
from ..rpc.test_faults import CALL_TIMEOUT
from .test_fidelity import ALL_OUTPUTS, PROMPT

EVERY_OUTPUT = [*ALL_OUTPUTS, "vision_layer_0", "vision_layer_-1", "lm_layer_0", "lm_layer_-1"]


def _request(extractor: Extractor, width: int, height: int, seed: int) -> Prepared:
    plan = extractor.plan(EVERY_OUTPUT)
    return extractor.prepare([noise_image(width, height, seed=seed)], PROMPT, plan)


def _assert_identical(actual: Extraction, expected: Extraction) -> None:
    assert actual.tensors.keys() == expected.tensors.keys()
    for name, array in expected.tensors.items():
        assert np.array_equal(actual.tensors[name], array), name


def _alone_at(extractor: Extractor, item: Prepared, width: int) -> Extraction:
    """``item`` run alone on a thread of its own with ``width`` torch threads."""
    thread = ModelThread()

    def run() -> Extraction:
        set_torch_threads(width)
        return extractor.run([item])[0]

    try:
        return thread.run(run)
    finally:
        thread.shutdown()


@contextmanager
def held_at_the_final_norm(
    extractor: Extractor, sequence_length: int, widths: dict[int, int] | None = None
) -> Iterator[threading.Event]:
    """Hold the forward whose sequence has ``sequence_length`` tokens at the language model's final
    norm until the yielded event is set; ``holding`` (an attribute of the event) is set meanwhile.
    ``widths`` records each forward's torch thread count by its sequence length."""
    release = threading.Event()
    holding = threading.Event()
    release.holding = holding  # type: ignore[attr-defined]

    def hook(_module: Any, args: tuple[Any, ...]) -> None:
        if widths is not None:
            widths[args[0].shape[1]] = torch.get_num_threads()
        if args[0].shape[1] == sequence_length:
            holding.set()
            assert release.wait(CALL_TIMEOUT), "the test never released the held forward"

    handle = extractor.loaded.language_model.norm.register_forward_pre_hook(hook)
    try:
        yield release
    finally:
        release.set()
        handle.remove()


def test_two_lanes_run_side_by_side_and_each_result_is_its_own(extractor: Extractor) -> None:
    """Two requests queued together run on the two lanes: the first is held inside its forward
    while the second runs whole; both results equal each request run alone at the same width, bit
    for bit, at every capture point."""
    held = _request(extractor, 112, 84, seed=1)
    other = _request(extractor, 56, 140, seed=2)
    assert held.sequence_length != other.sequence_length
    widths: dict[int, int] = {}

    async def scenario(release: threading.Event) -> tuple[Extraction, Extraction]:
        batcher = Batcher(extractor, BatchingConfig(max_wait_ms=1, lanes=2))
        try:
            first = asyncio.ensure_future(batcher.submit(held))
            late = asyncio.ensure_future(batcher.submit(other))  # queued in the same turn of the loop
            assert await asyncio.to_thread(release.holding.wait, CALL_TIMEOUT)  # type: ignore[attr-defined]
            second = await asyncio.wait_for(late, CALL_TIMEOUT)  # while the first is held
            assert not first.done()
            release.set()
            return await asyncio.wait_for(first, CALL_TIMEOUT), second
        finally:
            await batcher.close()

    with held_at_the_final_norm(extractor, held.sequence_length, widths) as release:
        first, second = asyncio.run(scenario(release))
    assert widths == {held.sequence_length: 1, other.sequence_length: 1}  # side by side: both narrow
    _assert_identical(first, _alone_at(extractor, held, 1))
    _assert_identical(second, _alone_at(extractor, other, 1))


def test_narrow_and_wide_runs_agree_within_float_rounding(extractor: Extractor) -> None:
    """A request run on one thread and on all of the model's (2 here at least, or the same run
    twice on a 1-CPU machine) agrees within what batching promises at every capture point; and
    a width is deterministic: the same width twice gives the same bits."""
    item = _request(extractor, 112, 84, seed=3)
    wide = max(2, torch.get_num_threads())
    narrow_run, wide_run = _alone_at(extractor, item, 1), _alone_at(extractor, item, wide)
    assert narrow_run.tensors.keys() == wide_run.tensors.keys()
    for name, array in wide_run.tensors.items():
        assert_batched_close(narrow_run.tensors[name], array, name)
    _assert_identical(_alone_at(extractor, item, wide), wide_run)
    _assert_identical(_alone_at(extractor, item, 1), narrow_run)


def test_one_lane_runs_one_batch_at_a_time(extractor: Extractor) -> None:
    """The control: with one lane the second request waits for the held one."""
    held = _request(extractor, 112, 84, seed=1)
    other = _request(extractor, 56, 140, seed=2)

    async def scenario(release: threading.Event) -> None:
        batcher = Batcher(extractor, BatchingConfig(max_wait_ms=1, lanes=1))
        try:
            first = asyncio.ensure_future(batcher.submit(held))
            assert await asyncio.to_thread(release.holding.wait, CALL_TIMEOUT)  # type: ignore[attr-defined]
            second = asyncio.ensure_future(batcher.submit(other))
            await asyncio.sleep(0.2)
            assert not second.done()
            release.set()
            await asyncio.wait_for(asyncio.gather(first, second), CALL_TIMEOUT)
        finally:
            await batcher.close()

    with held_at_the_final_norm(extractor, held.sequence_length) as release:
        asyncio.run(scenario(release))


@pytest.mark.parametrize(("lanes", "first"), [(2, 2), (1, 4)])
def test_a_batch_formed_beside_a_free_lane_takes_half_of_the_queue(
    extractor: Extractor, lanes: int, first: int
) -> None:
    """Four requests queued together: with a second lane free the first batch takes two (the
    second lane takes the rest, or the first lane again if it is done by then); with one lane, the
    control, all four."""
    items = [_request(extractor, 56, 56, seed=i) for i in range(4)]
    sizes: list[int] = []

    class Sizes:
        def batch_ran(self, requests: int, images: int, seconds: float) -> None:
            sizes.append(requests)

    async def scenario() -> list[Extraction]:
        batcher = Batcher(extractor, BatchingConfig(max_wait_ms=50, lanes=lanes), observer=Sizes())
        try:
            return list(await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in items)), CALL_TIMEOUT))
        finally:
            await batcher.close()

    results = asyncio.run(scenario())
    assert sizes[0] == first
    assert sum(sizes) == 4
    for result, item in zip(results, items, strict=True):
        expected = extractor.run([item])[0].tensors["lm_last_token"]
        assert_batched_close(result.tensors["lm_last_token"], expected)  # batched: the promise of a batch


def test_a_lone_run_is_wide_and_runs_side_by_side_are_narrow() -> None:
    """Only the first lane runs wide, only alone, and nothing starts beside a wide run."""

    async def scenario() -> None:
        lanes = ModelLanes(ModelThread(), count=2, threads=2)
        try:
            first, second = lanes.take(), lanes.take()
            assert first is lanes.first
            assert await lanes.call(first, torch.get_num_threads, alone=True) == 2
            assert await lanes.call(first, torch.get_num_threads, alone=False) == 1
            assert await lanes.call(second, torch.get_num_threads, alone=True) == 1

            inside = threading.Event()
            release = threading.Event()

            def held() -> int:
                inside.set()
                release.wait(CALL_TIMEOUT)
                inside.clear()
                return torch.get_num_threads()

            def beside() -> tuple[bool, int]:
                return inside.is_set(), torch.get_num_threads()

            wide = asyncio.ensure_future(lanes.call(first, held, alone=True))
            assert await asyncio.to_thread(inside.wait, CALL_TIMEOUT)
            late = asyncio.ensure_future(lanes.call(second, beside))
            await asyncio.sleep(0.2)
            assert not late.done()  # it waits for the wide run
            release.set()
            assert await wide == 2
            assert await late == (False, 1)
        finally:
            lanes.shutdown()

    asyncio.run(scenario())


def test_lanes_by_device_and_never_more_than_threads() -> None:
    assert BatchingConfig().lanes_for("cpu") == 2
    assert BatchingConfig().lanes_for("cuda") == 1
    assert BatchingConfig(lanes=3).lanes_for("cuda") == 3

    async def scenario() -> tuple[int, int, int]:
        lanes = ModelLanes(ModelThread(), count=4, threads=2)
        try:
            return lanes.count, lanes.narrow, lanes.free
        finally:
            lanes.shutdown()

    assert asyncio.run(scenario()) == (2, 1, 2)
    with pytest.raises(ValueError, match="lanes must be at least 1"):
        ModelLanes(ModelThread(), count=0, threads=2)
