"""What the SDK accepts as an image, and how each kind becomes an ``Image`` message."""

from __future__ import annotations

import io
import mimetypes
import os
from pathlib import Path
from typing import TypeAlias

import numpy as np
from PIL import Image as PILImage

from qwen25vl_embed.v1 import embed_pb2 as pb

__all__ = ["ImageInput", "to_image_message"]

ImageInput: TypeAlias = str | os.PathLike[str] | bytes | PILImage.Image | np.ndarray
"""An image: a file path, the encoded bytes of a file, a PIL image, or an ``[H, W, 3]`` / ``[H, W]``
``uint8`` array (RGB / grayscale)."""

# Modes that PNG stores as they are; any other mode is converted to RGB (RGBA if it has alpha).
_PNG_MODES = frozenset({"1", "L", "LA", "I;16", "P", "RGB", "RGBA"})


def to_image_message(image: ImageInput) -> pb.Image:
    """The ``Image`` message for ``image``.

    A path is sent as the file's bytes, unchanged, with a media type guessed from its suffix.
    Bytes are sent unchanged. PIL images and arrays are PNG-encoded (lossless), so the server
    sees exactly these pixels.

    Raises:
        TypeError: ``image`` is none of the accepted kinds.
        ValueError: an empty file or byte string, or an array of the wrong dtype or shape.
        OSError: the file cannot be read.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        data = path.read_bytes()
        if not data:
            raise ValueError(f"image file {str(path)!r} is empty")
        return pb.Image(data=data, mime_type=mimetypes.guess_type(path.name)[0] or "")
    if isinstance(image, (bytes, bytearray)):
        if not image:
            raise ValueError("image bytes are empty")
        return pb.Image(data=bytes(image))
    if isinstance(image, PILImage.Image):
        return _png_message(image)
    if isinstance(image, np.ndarray):
        return _png_message(_array_to_pil(image))
    raise TypeError(
        f"unsupported image type {type(image).__name__}; expected a path (str or os.PathLike), "
        "encoded bytes, a PIL.Image.Image or a uint8 numpy array"
    )


def _array_to_pil(array: np.ndarray) -> PILImage.Image:
    if array.dtype != np.uint8:
        raise ValueError(f"image array must have dtype uint8, got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"image array must have shape [H, W, 3] (RGB) or [H, W] (grayscale), got {list(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image array is empty: shape {list(array.shape)}")
    # fromarray infers the mode: L for [H, W], RGB for [H, W, 3] uint8.
    return PILImage.fromarray(np.ascontiguousarray(array))


def _png_message(image: PILImage.Image) -> pb.Image:
    if image.mode == "I":  # 32-bit integers: PNG stores at most 16 bits per sample
        image = PILImage.fromarray(np.clip(np.asarray(image), 0, 65535).astype(np.uint16))
    if image.mode not in _PNG_MODES:
        has_alpha = "A" in image.mode or image.mode.endswith("a")
        image = image.convert("RGBA" if has_alpha else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return pb.Image(data=buffer.getvalue(), mime_type="image/png")
