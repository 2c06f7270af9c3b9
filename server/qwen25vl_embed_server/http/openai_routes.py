"""The OpenAI-compatible routes (as vLLM serves them): ``POST /v1/embeddings``, ``POST /pooling``
(token vectors), ``GET /v1/models`` and ``GET /health``."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request

from qwen25vl_embed_server.http.encodings import base64_floats, encode
from qwen25vl_embed_server.http.inputs import Item, message_item, text_items
from qwen25vl_embed_server.http.running import TIMEOUT_HEADER, Embedder, Result
from qwen25vl_embed_server.http.schemas import EmbeddingsRequest

router = APIRouter()

OWNER = "qwen25vl-embed"


def embedder_of(request: Request) -> Embedder:
    embedder: Embedder = request.app.state.embedder
    return embedder


def _items(body: EmbeddingsRequest) -> list[Item]:
    return text_items(body.texts) if body.messages is None else [message_item(body.messages)]


def _usage(results: list[Result]) -> dict[str, int]:
    tokens = sum(result.tokens for result in results)
    return {"prompt_tokens": tokens, "total_tokens": tokens}


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingsRequest, request: Request) -> dict[str, Any]:
    """One vector per input (see :meth:`Embedder.one_vector`), in input order."""
    embedder = embedder_of(request)
    info = embedder.info()
    embedder.check_model(body.model, info)
    output = embedder.one_vector(info, body.dimensions)
    results = await embedder.run("/v1/embeddings", _items(body), info, output, request.headers.get(TIMEOUT_HEADER))
    data = [
        {"object": "embedding", "index": index, "embedding": encode(result.vectors, body.encoding_format)}
        for index, result in enumerate(results)
    ]
    return {"object": "list", "data": data, "model": embedder.served_name(info), "usage": _usage(results)}


@router.post("/pooling")
async def pooling(body: EmbeddingsRequest, request: Request) -> dict[str, Any]:
    """Token vectors per input, ``[T, E]``: a multi-vector checkpoint's (ColQwen2.5), else the
    LM's last hidden states. base64: float32 little-endian, row-major, T x E values."""
    embedder = embedder_of(request)
    info = embedder.info()
    embedder.check_model(body.model, info)
    output = embedder.token_vectors(info, body.dimensions)
    results = await embedder.run("/pooling", _items(body), info, output, request.headers.get(TIMEOUT_HEADER))
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
        "model": embedder.served_name(info),
        "data": data,
        "usage": _usage(results),
    }


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    """The names ``model`` may take: the served model (503 while it loads)."""
    embedder = embedder_of(request)
    info = embedder.info()
    card = {"id": embedder.served_name(info), "object": "model", "created": embedder.started, "owned_by": OWNER}
    return {"object": "list", "data": [{**card, "root": info.model}]}


@router.get("/health")
async def health(request: Request) -> dict[str, str]:
    """200 once the model is loaded; 503 (with ``Retry-After``) while it loads. No token needed."""
    embedder_of(request).info()
    return {"status": "ok"}
