"""Encoded image bytes -> an RGB PIL image, or a clear :class:`InvalidInputError`.

Conversions (what the model sees):
- EXIF orientation is applied, so the model sees the image as a viewer shows it.
- Transparency (RGBA, LA, palette with transparency) is composited over white.
- 16-bit grayscale keeps its 8 most significant bits.
- Animated images (GIF, WebP, APNG): the first frame.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidInputError

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def decode_image(data: bytes, index: int = 0) -> Image.Image:
    """Decode image number ``index`` of a request. Raises :class:`InvalidInputError`."""
    if not data:
        raise InvalidInputError(f"image {index} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # A decompression-bomb *warning* becomes an error: refuse rather than allocate.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return to_rgb(ImageOps.exif_transpose(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InvalidInputError(f"image {index} is too large to decode: {err}") from err
    except UnidentifiedImageError as err:
        raise InvalidInputError(
            f"image {index} could not be decoded: not a recognised image format ({len(data)} bytes)"
        ) from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise InvalidInputError(f"image {index} could not be decoded (corrupt or truncated?): {err}") from err


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of ``image`` following the conversions in the module docstring."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        pixels = np.asarray(image, dtype=np.uint32)
        top = 65535 if image.mode in _SIXTEEN_BIT_MODES or pixels.max(initial=0) > 255 else 255
        gray = (pixels.astype(np.float64) * (255.0 / top)).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
