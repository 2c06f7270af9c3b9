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

__all__ = ["build_request"]


def build_request(
    image: ImageInput | Sequence[ImageInput],
    prompt: str | None = None,
    outputs: Sequence[str] = (),
    dtype: str = "float32",
    normalize: bool = False,
    request_id: str = "",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> pb.ImageRequest:
    """The ``ImageRequest`` for :meth:`EmbeddingClient.extract`'s arguments, validated.

    Raises:
        ValueError: no image, a dtype other than "float32", "float16", "bfloat16", or a pixel
            bound below 1 (the server checks them against its range).
        TypeError: an image of an unsupported kind, or ``outputs`` given as a single string.
    """
    # Only lists and tuples mean several images: str and bytes are sequences too.
    images = list(image) if isinstance(image, (list, tuple)) else [cast(ImageInput, image)]
    if not images:
        raise ValueError("at least one image is required")
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
    )
    if prompt is not None:
        request.prompt = prompt
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value is not None:
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
            setattr(request, name, value)
    return request
