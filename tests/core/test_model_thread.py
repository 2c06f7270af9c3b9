"""One thread loads and runs the model; the preprocessing threads run torch ops on themselves alone."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from qwen25vl_embed_server.core.admission.request import EncodedRequest
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model
from qwen25vl_embed_server.core.scheduling.batcher import BatchingConfig
from qwen25vl_embed_server.core.scheduling.model_thread import ModelThread, single_threaded_torch
from qwen25vl_embed_server.core.scheduling.pipeline import Pipeline, PipelineConfig

from ..helpers import noise_image, png_bytes


def test_single_threaded_torch_caps_the_calling_thread_only() -> None:
    before = torch.get_num_threads()
    x = torch.arange(1_000_000, dtype=torch.float64)

    def capped() -> tuple[int, float]:
        single_threaded_torch()
        return torch.get_num_threads(), float(x.sum())  # a large op still runs, on this thread

    with ThreadPoolExecutor(1) as pool:
        threads, total = pool.submit(capped).result()
    assert threads == 1
    assert total == float(x.sum())
    assert torch.get_num_threads() == before  # this thread (and the model's) keep theirs
    with ThreadPoolExecutor(1) as pool:  # a fresh thread starts with torch's count, not the cap
        assert pool.submit(torch.get_num_threads).result() == before


def test_the_cap_holds_where_the_process_set_torchs_thread_count() -> None:
    """Once ``torch.set_num_threads`` has run (a Ray actor sets its CPUs so), torch's lazy set-up of
    a new thread's count would overwrite a cap made before it: the cap runs that set-up first. In a
    child process, so that this process's threads keep torch's own default."""
    probe = (
        "import qwen25vl_embed_server, threading, torch\n"
        "from qwen25vl_embed_server.core.scheduling.model_thread import single_threaded_torch\n"
        "torch.set_num_threads(2)\n"
        "seen = []\n"
        "def capped():\n"
        "    single_threaded_torch()\n"
        "    torch.ones(100_000).sum()\n"
        "    seen.append(torch.get_num_threads())\n"
        "thread = threading.Thread(target=capped)\n"
        "thread.start()\n"
        "thread.join()\n"
        "print(seen[0], torch.get_num_threads())\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "2"]


def test_preprocessing_workers_stay_single_threaded_after_real_requests(extractor: Extractor) -> None:
    """The processor's torch ops (resize, normalise) run inside the worker: its count stays 1."""
    requests = [EncodedRequest(images=[png_bytes(noise_image(300, 200, seed=i))]) for i in range(4)]
    before = torch.get_num_threads()

    async def scenario() -> list[int]:
        pipeline = Pipeline(extractor, PipelineConfig(preprocess_workers=2))
        try:
            await asyncio.gather(*(pipeline.prepare(request) for request in requests))
            loop = asyncio.get_running_loop()
            return list(
                await asyncio.gather(
                    *(loop.run_in_executor(pipeline._preprocess, torch.get_num_threads) for _ in range(4))
                )
            )
        finally:
            await pipeline.close()

    assert asyncio.run(scenario()) == [1, 1, 1, 1]
    assert torch.get_num_threads() == before  # the caller's thread keeps its count


@pytest.mark.parametrize("lanes", [1, 2])
def test_the_thread_that_loads_the_model_runs_every_batch(tiny_model_path: Path, lanes: int) -> None:
    """Loading on the model thread, then a pipeline on it with one lane: every forward runs on that
    thread. With two lanes, the first is that thread (and the lone first request runs there)."""
    forwards: list[int] = []

    async def scenario() -> tuple[int, list[int]]:
        model_thread = ModelThread()
        options = LoadOptions(model=str(tiny_model_path), device="cpu", dtype="float32")
        loaded_on = await model_thread.call(threading.get_ident)
        extractor = await model_thread.call(lambda: Extractor(load_model(options)))
        extractor.loaded.visual.register_forward_pre_hook(lambda *_: forwards.append(threading.get_ident()))
        config = PipelineConfig(batching=BatchingConfig(lanes=lanes))
        pipeline = Pipeline(extractor, config, model_thread=model_thread)
        try:
            images = [png_bytes(noise_image(56 + 28 * i, 56, seed=i)) for i in range(3)]
            await pipeline.run(EncodedRequest(images=[images[0]]))
            await asyncio.gather(*(pipeline.run(EncodedRequest(images=[image])) for image in images))
        finally:
            await pipeline.close()
        return loaded_on, forwards

    loaded_on, seen = asyncio.run(scenario())
    assert seen, "the model ran"
    assert seen[0] == loaded_on
    assert set(seen) == {loaded_on} if lanes == 1 else len(set(seen)) <= 2
    assert threading.get_ident() not in seen


def test_the_bulk_actor_runs_its_model_on_the_thread_that_loaded_it(tiny_model_path: Path, tmp_path: Path) -> None:
    """Ray Data builds the actor on one thread and calls it on another (a thread pool of its own):
    the calls preprocess on theirs, capped, and run the model on the actor's model thread."""
    import numpy as np

    from qwen25vl_embed_server.ray.bulk_actor import BulkExtractionActor
    from qwen25vl_embed_server.ray.bulk_job import BulkJob

    paths = []
    for index in range(3):
        paths.append(tmp_path / f"image{index}.png")
        paths[-1].write_bytes(png_bytes(noise_image(56 + 28 * index, 56, seed=index)))
    load = LoadOptions(model=str(tiny_model_path), device="cpu", dtype="float32")
    before = torch.get_num_threads()
    try:  # the actor sets its process's torch threads to its CPUs (Ray gives it a process of its own)
        actor = BulkExtractionActor(BulkJob(source=str(tmp_path), output=tmp_path / "out", load=load))
    finally:  # this process is the test suite's: later tests and their threads keep the count
        torch.set_num_threads(before)
    loaded_on = actor._model_thread.run(threading.get_ident)
    forwards: list[int] = []
    actor._extractor.loaded.visual.register_forward_pre_hook(lambda *_: forwards.append(threading.get_ident()))

    def ray_call() -> tuple[int, int]:
        table = actor({"path": np.array([str(path) for path in paths])})
        return table.num_rows, torch.get_num_threads()

    with ThreadPoolExecutor(1) as ray_thread:
        rows, threads = ray_thread.submit(ray_call).result()
    assert rows == len(paths)
    assert threads == 1
    assert forwards
    assert set(forwards) == {loaded_on}
    assert loaded_on != threading.get_ident()
