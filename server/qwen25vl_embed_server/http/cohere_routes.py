"""The Cohere-compatible route (v2, as vLLM serves it): ``POST /v2/embed``."""

from __future__ import annotations

import io
import uuid
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from PIL import Image

from qwen25vl_embed_server.core.errors import InvalidInputError
from qwen25vl_embed_server.http.encodings import encode
from qwen25vl_embed_server.http.inputs import Item, image_items, text_items
from qwen25vl_embed_server.http.openai_routes import embedder_of
from qwen25vl_embed_server.http.running import TIMEOUT_HEADER
from qwen25vl_embed_server.http.schemas import CohereEmbedRequest
from qwen25vl_embed_server.http.selection import Selection

router = APIRouter()

DOCUMENT_TYPES = ("search_document", "classification", "clustering")


def _items(body: CohereEmbedRequest, selection: Selection) -> tuple[list[Item], Selection]:
    """The inputs, after the checks ``input_type`` implies, and the selection with the texts' role:
    on a retrieval recipe, texts are queries (``search_query``) or, where the recipe embeds text
    documents (jina-embeddings-v4's passages), passages (``search_document``, ``classification``,
    ``clustering``); images are documents."""
    recipe = selection.recipe
    if body.texts is not None:
        if body.input_type == "image":
            raise InvalidInputError("input_type image goes with images, not texts")
        if recipe is not None and body.input_type is not None:
            role = "passage" if body.input_type in DOCUMENT_TYPES else "query"
            if selection.role not in (None, role):
                raise InvalidInputError(
                    f"input_type {body.input_type} and task {body.task} disagree: one embeds texts as "
                    f"{role}s, the other as {selection.role}s; give one of them"
                )
            if role == "passage" and not recipe.passage_prefix:
                raise InvalidInputError(
                    f"input_type {body.input_type}: this checkpoint's recipe ({recipe.name}) embeds texts as "
                    "queries only (its documents are images); send input_type search_query, or the documents "
                    "as images"
                )
            selection = replace(selection, role=role)
        return text_items(body.texts), selection
    if body.input_type == "search_query":
        raise InvalidInputError(
            "input_type search_query takes texts; images are embedded as documents (input_type image)"
        )
    return image_items(body.images or []), selection


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
    items, selection = _items(body, embedder.select(info, body.model, body.adapter, body.task))
    output = embedder.one_vector(selection.recipe, body.output_dimension)
    results = await embedder.run("/v2/embed", items, selection, output, request.headers.get(TIMEOUT_HEADER))
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
