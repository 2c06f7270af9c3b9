"""Runs one HTTP request's inputs through the shared pipeline, each observed as the gRPC edge
observes its requests (the same metrics and request log), and names the vector a route returns."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from qwen25vl_embed_server.core.admission.request import EncodedRequest
from qwen25vl_embed_server.core.defaults import DEFAULT_STREAM_WINDOW
from qwen25vl_embed_server.core.errors import InvalidInputError, LimitExceededError, quoted
from qwen25vl_embed_server.core.model.finishing import Extraction
from qwen25vl_embed_server.core.model.model_info import ModelInfo, RecipeInfo
from qwen25vl_embed_server.core.model.output_settings import OutputSettings
from qwen25vl_embed_server.core.model.outputs import LM_LAST_HIDDEN
from qwen25vl_embed_server.core.retrieval.recipes import MULTI_VECTOR
from qwen25vl_embed_server.core.scheduling.pipeline import Pipeline
from qwen25vl_embed_server.http.config import HTTPConfig
from qwen25vl_embed_server.http.inputs import Item, encoded
from qwen25vl_embed_server.http.selection import Selection, select
from qwen25vl_embed_server.rpc.metrics import Metrics
from qwen25vl_embed_server.rpc.observation import RequestObservation

TIMEOUT_HEADER = "x-request-timeout"
"""Optional request header: seconds the caller waits; a request still queued then is dropped (504)."""


@dataclass(frozen=True)
class Result:
    """One input's vectors (float32: ``[E]`` for one vector, ``[T, E]`` for token vectors) and its
    LM sequence length (its prompt tokens)."""

    vectors: np.ndarray
    tokens: int


class Embedder:
    """The HTTP routes' access to the model: its pipeline (``pipeline()`` raises
    ModelNotReadyError while the model loads), the metrics and request log, and the settings."""

    def __init__(self, pipeline: Callable[[], Pipeline], metrics: Metrics, config: HTTPConfig) -> None:
        self._pipeline = pipeline
        self.metrics = metrics
        self.config = config
        self.started = int(time.time())  # GET /v1/models' "created"

    @property
    def pipeline(self) -> Pipeline:
        return self._pipeline()

    def info(self) -> ModelInfo:
        return self.pipeline.info()

    def served_name(self, info: ModelInfo) -> str:
        return self.config.served_model_name or info.model

    def select(self, info: ModelInfo, model: str | None, adapter: str | None, task: str | None) -> Selection:
        """The request's adapter, task and text role (:func:`~.selection.select`)."""
        return select(info, self.served_name(info), model, adapter, task)

    def one_vector(self, recipe: RecipeInfo | None, dimensions: int | None) -> tuple[str, OutputSettings]:
        """The output and settings of the one vector per input that /v1/embeddings and /v2/embed
        return: the recipe's single vector (the adapter's, when one is named), or (raw
        checkpoint) the configured pooled vector, L2-normalised. ``dimensions``: Matryoshka
        truncation, retrieval recipes only."""
        if recipe is None:
            if dimensions is not None:
                raise InvalidInputError(
                    "dimensions: this checkpoint has no retrieval recipe, so no Matryoshka vectors; leave it out"
                )
            return self.config.vector, OutputSettings(normalize=True)
        if recipe.output == MULTI_VECTOR:
            raise InvalidInputError(
                f"this checkpoint ({recipe.name}) returns one vector per token, not one per input: "
                "POST /pooling returns them"
            )
        return recipe.output, OutputSettings(dimensions=dimensions or 0)

    @staticmethod
    def token_vectors(recipe: RecipeInfo | None, dimensions: int | None) -> tuple[str, OutputSettings]:
        """The output and settings of /pooling: the recipe's multi-vectors (ColQwen2.5's, or
        jina-embeddings-v4's beside its single vector), else the LM's last hidden states (not
        normalised)."""
        if recipe is not None and MULTI_VECTOR in recipe.outputs:
            return MULTI_VECTOR, OutputSettings(dimensions=dimensions or 0)
        if dimensions is not None:
            raise InvalidInputError("dimensions applies to a multi-vector checkpoint's vectors only; leave it out")
        return LM_LAST_HIDDEN, OutputSettings()

    async def run(
        self,
        route: str,
        items: Sequence[Item],
        selection: Selection,
        output: tuple[str, OutputSettings],
        timeout: str | None = None,
    ) -> list[Result]:
        """Every item's result, in order; the first failure fails the whole request (the others are
        cancelled). Raises domain errors, or HTTPError (413: more inputs than ``max_inputs``)."""
        if len(items) > self.config.max_inputs:
            raise LimitExceededError(
                "max_inputs",
                f"the request has {len(items)} inputs; the limit is max_inputs={self.config.max_inputs} "
                "(set with --http-max-inputs)",
            )
        deadline = _deadline(timeout)
        name, settings = output
        tag = uuid.uuid4().hex[:12]
        requests = [
            encoded(item, selection, name, settings, f"{tag}/{index}", f"input {index}")
            for index, item in enumerate(items)
        ]
        # Inputs in flight at once, as an ExtractBatch stream's window: a large request on an idle
        # server waits for its own earlier inputs instead of filling the admission bound itself.
        window = asyncio.Semaphore(max(1, min(DEFAULT_STREAM_WINDOW, self.pipeline.config.admitted)))
        tasks = [
            asyncio.ensure_future(self._one(route, request, name, deadline, index, window))
            for index, request in enumerate(requests)
        ]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _one(
        self,
        route: str,
        request: EncodedRequest,
        name: str,
        deadline: float | None,
        index: int,
        window: asyncio.Semaphore,
    ) -> Result:
        async with window:
            return await self._observed(route, request, name, deadline, index)

    async def _observed(
        self, route: str, request: EncodedRequest, name: str, deadline: float | None, index: int
    ) -> Result:
        observation = RequestObservation.begin(route, request.request_id, len(request.images), (name,), self.metrics)
        try:
            result: Extraction = await self.pipeline.run(request, deadline, observation)
            observation.outputs_ready(result.sequence_length)
            array = np.asarray(result.tensors[name], dtype=np.float32)
            # [1, E] (one vector), [1, T, D] (last hidden states) -> [E], [T, D]; multi_vector stays [T, E].
            vectors = array if name == MULTI_VECTOR else array[0]
            return Result(vectors=vectors, tokens=result.sequence_length)
        except BaseException as error:
            observation.failed(error)
            located = _located(error, f"input {index}")
            if located is error:
                raise
            raise located from error
        finally:
            observation.finish()


def _located(error: BaseException, where: str) -> BaseException:
    """A refusal of one input, its message saying which input."""
    if isinstance(error, LimitExceededError):
        return LimitExceededError(error.limit, f"{where}: {error}")
    if isinstance(error, InvalidInputError):
        return InvalidInputError(f"{where}: {error}")
    return error


def _deadline(timeout: str | None) -> float | None:
    if timeout is None:
        return None
    try:
        seconds = float(timeout)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise InvalidInputError(f"{TIMEOUT_HEADER} must be a positive number of seconds, got {quoted(timeout)}")
    return time.monotonic() + seconds
