"""The Cohere-compatible route (v2, as vLLM serves it): ``POST /v2/embed``."""

from __future__ import annotations

import io
import uuid
from typing import Any

from fastapi import APIRouter, Request
from PIL import Image

from qwen25vl_embed_server.core.errors import InvalidInputError
from qwen25vl_embed_server.core.model.model_info import ModelInfo
from qwen25vl_embed_server.http.encodings import encode
from qwen25vl_embed_server.http.inputs import Item, image_items, text_items
from qwen25vl_embed_server.http.openai_routes import embedder_of
from qwen25vl_embed_server.http.running import TIMEOUT_HEADER
from qwen25vl_embed_server.http.schemas import CohereEmbedRequest

router = APIRouter()

DOCUMENT_TYPES = ("search_document", "classification", "clustering")


def _items(body: CohereEmbedRequest, info: ModelInfo) -> list[Item]:
    """The inputs, after the checks ``input_type`` implies: texts are queries on a retrieval
    checkpoint (its recipe has no text-document format), images are documents."""
    if body.texts is not None:
        if body.input_type == "image":
            raise InvalidInputError("input_type image goes with images, not texts")
        if info.recipe is not None and body.input_type in DOCUMENT_TYPES:
            raise InvalidInputError(
                f"input_type {body.input_type}: this checkpoint's recipe ({info.recipe.name}) embeds texts as "
                "queries only (its documents are images); send input_type search_query, or the documents as images"
            )
        return text_items(body.texts)
    if body.input_type == "search_query":
        raise InvalidInputError(
            "input_type search_query takes texts; images are embedded as documents (input_type image)"
        )
    return image_items(body.images or [])


def _image_meta(item: Item) -> dict[str, Any]:
    """Cohere's description of an input image, from its header (the pipeline decoded it already)."""
    with Image.open(io.BytesIO(item.images[0])) as image:
        depth = 16 if image.mode.startswith("I;16") else 8
        return {
            "width": image.width,
            "height": image.height,
            "format": (image.format or "").lower(),
            "bit_depth": depth,
        }


@router.post("/v2/embed")
async def embed(body: CohereEmbedRequest, request: Request) -> dict[str, Any]:
    """One vector per text or image in each of ``embedding_types`` (see :mod:`.encodings`)."""
    embedder = embedder_of(request)
    info = embedder.info()
    embedder.check_model(body.model, info)
    items = _items(body, info)
    output = embedder.one_vector(info, body.output_dimension)
    results = await embedder.run("/v2/embed", items, info, output, request.headers.get(TIMEOUT_HEADER))
    kinds = dict.fromkeys(body.embedding_types)
    tokens = sum(result.tokens for result in results)
    images = [_image_meta(item) for item in items if item.images]
    billed = {"input_tokens": tokens, "images": len(images)} if images else {"input_tokens": tokens}
    return {
        "id": str(uuid.uuid4()),
        "embeddings": {kind: [encode(result.vectors, kind) for result in results] for kind in kinds},
        "texts": body.texts or [],
        "images": images,
        "meta": {"api_version": {"version": "2"}, "billed_units": billed},
    }
