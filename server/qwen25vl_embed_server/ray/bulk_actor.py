"""The Ray Data actor of a bulk job: the model loaded once, batches of paths turned into rows.

Each image goes through :func:`~qwen25vl_embed_server.core.admission.request.prepare_request`, the chain
the server uses, so a bulk job applies the same checks (the job's
:attr:`~qwen25vl_embed_server.ray.bulk_job.BulkJob.limits`, the prompt's tokens included).

Ray Data constructs the actor on one thread and calls it on another, so, as in the server
(:mod:`~qwen25vl_embed_server.core.scheduling.model_thread`), the model loads and runs on a model thread of
the actor's own, and the thread Ray calls on preprocesses with torch on itself alone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from qwen25vl_embed_server.core.admission.request import EncodedRequest, prepare_request
from qwen25vl_embed_server.core.errors import DeviceOutOfMemoryError, InvalidInputError
from qwen25vl_embed_server.core.model.extractor import Extractor, Prepared
from qwen25vl_embed_server.core.model.finishing import Extraction, serving
from qwen25vl_embed_server.core.model.output_settings import OutputSettings
from qwen25vl_embed_server.core.scheduling.batcher import BatchingConfig
from qwen25vl_embed_server.core.scheduling.model_thread import ModelThread, single_threaded_torch
from qwen25vl_embed_server.ray.parquet_format import _table, output_schema

if TYPE_CHECKING:
    from qwen25vl_embed_server.ray.bulk_job import BulkJob


class BulkExtractionActor:
    """The Ray Data actor: loads the model once, then turns batches of paths into Arrow rows."""

    def __init__(self, job: BulkJob) -> None:
        import torch

        from qwen25vl_embed_server.core.model.loading import load_model

        if job.gpus_per_actor == 0:
            torch.set_num_threads(max(1, int(job.cpus_per_actor)))
        self._job = job
        self._limits = job.limits
        self._model_thread = ModelThread()
        self._extractor = self._model_thread.run(lambda: Extractor(load_model(job.load)))
        self._preprocessing = threading.local()  # the threads Ray calls on, each capped once
        self._plan = self._extractor.plan(job.outputs, adapter=job.adapter)
        self._prompt_format = request_format(
            job, has_recipe=serving(self._extractor.loaded, job.adapter)[0] is not None
        )
        self._max_tokens = BatchingConfig(max_tokens=job.max_batch_tokens).tokens_for(
            self._extractor.loaded.device.type
        )
        self._schema = output_schema(self._plan.names)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if not getattr(self._preprocessing, "capped", False):
            single_threaded_torch()
            self._preprocessing.capped = True
        paths = [str(path) for path in batch["path"]]
        outcomes: list[Extraction | str] = ["" for _ in paths]
        prepared: list[tuple[int, Prepared]] = []
        for index, path in enumerate(paths):
            try:
                request = EncodedRequest(
                    images=[Path(path).read_bytes()],
                    prompt=self._job.prompt,
                    outputs=self._job.outputs,
                    settings=OutputSettings(normalize=self._job.normalize),
                    prompt_format=self._prompt_format,
                    adapter=self._job.adapter,
                    task=self._job.task,
                )
                item = prepare_request(self._extractor, request, self._limits, self._plan)
            except (InvalidInputError, OSError) as error:
                outcomes[index] = str(error)
            else:
                prepared.append((index, item))
        for chunk in _chunks(prepared, self._max_tokens):
            for index, outcome in zip([i for i, _ in chunk], self._run([item for _, item in chunk]), strict=True):
                outcomes[index] = outcome
        return _table(paths, outcomes, self._schema)

    def _run(self, items: list[Prepared]) -> list[Extraction | str]:
        """One model call; when it fails (device memory, a rejected image), each item alone."""
        try:
            return list(self._model_thread.run(self._extractor.run, items))
        except (InvalidInputError, DeviceOutOfMemoryError) as error:
            if len(items) == 1:
                return [str(error)]
        return [outcome for item in items for outcome in self._run([item])]


def request_format(job: BulkJob, has_recipe: bool) -> str:
    """The prompt format every image's request carries: ``job.prompt_format``, "auto" resolved
    ("document" for a model, or ``job.adapter``, with a retrieval recipe; else "chat").

    Raises:
        ValueError: the document format with a prompt (its template has none).
    """
    chosen = job.prompt_format
    if chosen == "auto":
        chosen = "document" if has_recipe else "chat"
    if chosen == "document" and job.prompt is not None:
        raise ValueError(
            f"a prompt with the document format (prompt format {job.prompt_format}): the recipe's document "
            "template has no prompt; drop --prompt, or give --prompt-format chat"
        )
    return chosen


def _chunks(items: list[tuple[int, Prepared]], max_tokens: int) -> Iterator[list[tuple[int, Prepared]]]:
    """Consecutive runs of ``items`` whose cost stays within ``max_tokens`` (at least one each)."""
    chunk: list[tuple[int, Prepared]] = []
    tokens = 0
    for entry in items:
        if chunk and tokens + entry[1].cost > max_tokens:
            yield chunk
            chunk, tokens = [], 0
        chunk.append(entry)
        tokens += entry[1].cost
    if chunk:
        yield chunk
