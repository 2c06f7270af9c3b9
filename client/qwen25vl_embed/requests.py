"""Request building: the arguments of ``extract``, validated, as an ``ImageRequest`` message.

:func:`build_request` is shared by the sync and asyncio clients, for ``extract`` and for each
input of ``extract_many``. Nothing here touches the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from qwen25vl_embed import codec
from qwen25vl_embed.images import ImageInput, to_image_message
from qwen25vl_embed.v1 import embed_pb2 as pb

__all__ = ["PROMPT_FORMATS", "VECTOR_ENCODINGS", "build_request", "retrieval_request"]

PROMPT_FORMATS = {
    "chat": pb.PROMPT_FORMAT_CHAT,
    "raw": pb.PROMPT_FORMAT_RAW,
    "query": pb.PROMPT_FORMAT_QUERY,
    "document": pb.PROMPT_FORMAT_DOCUMENT,
}
"""The prompt formats (see the proto's PromptFormat): chat (default), raw, query, document."""

VECTOR_ENCODINGS = {
    "float": pb.VECTOR_ENCODING_FLOAT,
    "int8": pb.VECTOR_ENCODING_INT8,
    "binary": pb.VECTOR_ENCODING_BINARY,
}
"""Wire forms of the retrieval outputs (the proto's VectorEncoding): float (default), int8, binary."""


def build_request(
    image: ImageInput | Sequence[ImageInput] | None,
    prompt: str | None = None,
    outputs: Sequence[str] = (),
    dtype: str = "float32",
    normalize: bool = False,
    request_id: str = "",
    prompt_format: str = "chat",
    dimensions: int = 0,
    vector_encoding: str = "float",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> pb.ImageRequest:
    """The ``ImageRequest`` for :meth:`EmbeddingClient.extract`'s arguments, validated.

    ``image`` None (or an empty list): a text request, which needs a prompt.

    Raises:
        ValueError: neither image nor prompt, an unknown prompt format, negative ``dimensions``,
            a dtype other than "float32", "float16", "bfloat16", or a pixel bound below 1 (the
            server checks them against its range).
        TypeError: an image of an unsupported kind, or ``outputs`` given as a single string.
    """
    # Only lists and tuples mean several images: str and bytes are sequences too.
    if image is None:
        images: list[ImageInput] = []
    else:
        images = list(image) if isinstance(image, (list, tuple)) else [cast(ImageInput, image)]
    if not images and prompt is None:
        raise ValueError("a request needs an image or a prompt (a text request)")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {list(PROMPT_FORMATS)}, got {prompt_format!r}")
    if vector_encoding not in VECTOR_ENCODINGS:
        raise ValueError(f"vector_encoding must be one of {list(VECTOR_ENCODINGS)}, got {vector_encoding!r}")
    if dimensions < 0:
        raise ValueError(f"dimensions must be 0 (all) or positive, got {dimensions}")
    if isinstance(outputs, str):
        raise TypeError(f"outputs must be a sequence of names, not the string {outputs!r}")
    if dtype not in codec.FLOAT_DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(codec.FLOAT_DTYPE_NAMES)}, got {dtype!r}")
    request = pb.ImageRequest(
        images=[to_image_message(item) for item in images],
        outputs=list(outputs),
        dtype=codec.dtype_from_name(dtype),
        request_id=request_id,
        normalize=normalize,
        prompt_format=PROMPT_FORMATS[prompt_format],
        dimensions=dimensions,
        vector_encoding=VECTOR_ENCODINGS[vector_encoding],
    )
    if prompt is not None:
        request.prompt = prompt
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value is not None:
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
            setattr(request, name, value)
    return request


def retrieval_request(
    image: ImageInput | None, text: str | None, index: int, prompt_format: str, dimensions: int, encoding: str
) -> pb.ImageRequest:
    """The request of ``embed_queries`` / ``embed_images``: the recipe's format, its default output."""
    return build_request(
        image, text, (), "float32", False, str(index), prompt_format, dimensions, vector_encoding=encoding
    )
