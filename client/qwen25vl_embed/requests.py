"""Request building: a request's settings, validated, as an ``ImageRequest`` message.

:func:`request_from_options` is the one place a request is built: the sync and asyncio clients
call it for ``extract``, for each input of ``extract_many`` and for the retrieval methods.
:func:`build_request` is the same with the settings as arguments. Nothing here touches the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from qwen25vl_embed import codec
from qwen25vl_embed.choices import PromptFormat, VectorEncoding
from qwen25vl_embed.images import ImageInput, to_image_message
from qwen25vl_embed.options import ExtractOptions
from qwen25vl_embed.v1 import embed_pb2 as pb

__all__ = ["build_request", "request_from_options"]


def build_request(
    image: ImageInput | Sequence[ImageInput] | None,
    prompt: str | None = None,
    outputs: Sequence[str] = (),
    dtype: str = "float32",
    normalize: bool = False,
    request_id: str = "",
    prompt_format: PromptFormat | str = PromptFormat.CHAT,
    dimensions: int = 0,
    vector_encoding: VectorEncoding | str = VectorEncoding.FLOAT,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    adapter: str = "",
    task: str = "",
) -> pb.ImageRequest:
    """The ``ImageRequest`` of these settings (as :class:`~qwen25vl_embed.ExtractOptions`'s), validated.

    Raises:
        As :func:`request_from_options`.
    """
    options = ExtractOptions(
        prompt=prompt,
        outputs=outputs,
        dtype=dtype,
        normalize=normalize,
        prompt_format=prompt_format,
        dimensions=dimensions,
        vector_encoding=vector_encoding,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        adapter=adapter,
        task=task,
    )
    return request_from_options(image, options, request_id)


def request_from_options(
    image: ImageInput | Sequence[ImageInput] | None, options: ExtractOptions, request_id: str = ""
) -> pb.ImageRequest:
    """The ``ImageRequest`` of ``image`` with ``options``, validated.

    ``image`` None (or an empty list): a text request, which needs a prompt.

    Raises:
        ValueError: neither image nor prompt, an unknown prompt format or vector encoding, negative
            ``dimensions``, a dtype other than "float32", "float16", "bfloat16", or a pixel bound
            below 1 (the server checks them against its range).
        TypeError: an image of an unsupported kind, or ``outputs`` given as a single string.
    """
    # Only lists and tuples mean several images: str and bytes are sequences too.
    if image is None:
        images: list[ImageInput] = []
    else:
        images = list(image) if isinstance(image, (list, tuple)) else [cast(ImageInput, image)]
    prompt, outputs, dtype, dimensions = options.prompt, options.outputs, options.dtype, options.dimensions
    if not images and prompt is None:
        raise ValueError("a request needs an image or a prompt (a text request)")
    prompt_format = PromptFormat.parse(options.prompt_format, "prompt_format")
    vector_encoding = VectorEncoding.parse(options.vector_encoding, "vector_encoding")
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
        normalize=options.normalize,
        prompt_format=prompt_format.proto,
        dimensions=dimensions,
        vector_encoding=vector_encoding.proto,
        adapter=options.adapter,
        task=options.task,
    )
    if prompt is not None:
        request.prompt = prompt
    for name, value in (("min_pixels", options.min_pixels), ("max_pixels", options.max_pixels)):
        if value is not None:
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
            setattr(request, name, value)
    return request
