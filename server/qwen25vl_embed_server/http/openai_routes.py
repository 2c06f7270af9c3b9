"""The OpenAI-compatible routes (as vLLM serves them): ``POST /v1/embeddings``, ``POST /pooling``
(token vectors), ``GET /v1/models`` and ``GET /health``."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request

from qwen25vl_embed_server.core.model.model_info import ModelInfo
from qwen25vl_embed_server.http.encodings import base64_floats, encode
from qwen25vl_embed_server.http.inputs import Item, message_item, text_items
from qwen25vl_embed_server.http.running import TIMEOUT_HEADER, Embedder, Result
from qwen25vl_embed_server.http.schemas import EmbeddingsRequest
from qwen25vl_embed_server.http.selection import Selection

router = APIRouter()

OWNER = "qwen25vl-embed"


def embedder_of(request: Request) -> Embedder:
    embedder: Embedder = request.app.state.embedder
    return embedder


def _items(body: EmbeddingsRequest) -> list[Item]:
    return text_items(body.texts) if body.messages is None else [message_item(body.messages)]


def _model(embedder: Embedder, info: ModelInfo, selection: Selection) -> str:
    """A response's ``model``: the adapter that ran, else the served model's name."""
    return selection.adapter or embedder.served_name(info)


def _usage(results: list[Result]) -> dict[str, int]:
    tokens = sum(result.tokens for result in results)
    return {"prompt_tokens": tokens, "total_tokens": tokens}


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingsRequest, request: Request) -> dict[str, Any]:
    """One vector per input (see :meth:`Embedder.one_vector`), in input order."""
    embedder = embedder_of(request)
    info = embedder.info()
    selection = embedder.select(info, body.model, body.adapter, body.task)
    output = embedder.one_vector(selection.recipe, body.dimensions)
    timeout = request.headers.get(TIMEOUT_HEADER)
    results = await embedder.run("/v1/embeddings", _items(body), selection, output, timeout)
    data = [
        {"object": "embedding", "index": index, "embedding": encode(result.vectors, body.encoding_format)}
        for index, result in enumerate(results)
    ]
    return {"object": "list", "data": data, "model": _model(embedder, info, selection), "usage": _usage(results)}


@router.post("/pooling")
async def pooling(body: EmbeddingsRequest, request: Request) -> dict[str, Any]:
    """Token vectors per input, ``[T, E]``: a multi-vector checkpoint's (ColQwen2.5), else the
    LM's last hidden states. base64: float32 little-endian, row-major, T x E values."""
    embedder = embedder_of(request)
    info = embedder.info()
    selection = embedder.select(info, body.model, body.adapter, body.task)
    output = embedder.token_vectors(selection.recipe, body.dimensions)
    results = await embedder.run("/pooling", _items(body), selection, output, request.headers.get(TIMEOUT_HEADER))
    data = [
        {
            "index": index,
            "object": "pooling",
            "data": base64_floats(result.vectors) if body.encoding_format == "base64" else result.vectors.tolist(),
        }
        for index, result in enumerate(results)
    ]
    return {
        "id": f"pool-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": _model(embedder, info, selection),
        "data": data,
        "usage": _usage(results),
    }


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    """The names ``model`` may take: the served model, then each retrieval adapter served beside
    it (``parent``: the served model, as vLLM lists LoRA adapters); 503 while the model loads."""
    embedder = embedder_of(request)
    info = embedder.info()
    served = embedder.served_name(info)
    card = {"object": "model", "created": embedder.started, "owned_by": OWNER}
    adapters = [{**card, "id": adapter.name, "root": adapter.name, "parent": served} for adapter in info.adapters]
    return {"object": "list", "data": [{**card, "id": served, "root": info.model}, *adapters]}


@router.get("/health")
async def health(request: Request) -> dict[str, str]:
    """200 once the model is loaded; 503 (with ``Retry-After``) while it loads. No token needed."""
    embedder_of(request).info()
    return {"status": "ok"}
