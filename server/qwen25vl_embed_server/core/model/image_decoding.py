"""Encoded image bytes -> an RGB PIL image, or a clear :class:`InvalidInputError`.

Safety (the bytes come from the network):
- Only the formats in :data:`.image_formats.ALLOWED_FORMATS` are opened (photos and the common
  web formats). Pillow's other plugins stay closed: some run external programs (EPS runs
  Ghostscript) and most are rarely used and rarely hardened.
- The declared size is checked before any pixel is decoded: ``Image.open`` reads the header
  only, and an image of more than ``max_pixels`` pixels (width x height) is refused. A
  decompression bomb (a small file that decodes to a gigantic image) costs a header read.
- Truncated or corrupt files are refused, never padded (Pillow's ``LOAD_TRUNCATED_IMAGES`` is
  left off).
- JPEG is checked strictly as well: libjpeg treats a scan cut short (and given an end marker),
  or garbled entropy-coded data, as a *warning*, pads the missing blocks with gray, and Pillow
  silences those warnings. The scan is therefore also decoded by libjpeg-turbo through
  ``simplejpeg`` in strict mode (warnings are errors), at 1/8 scale: entropy decoding still reads
  every coefficient, the inverse DCT is cheap (layouts TurboJPEG cannot read, such as subsampled
  CMYK, keep Pillow's checks only). Formats without entropy-coded checks stay as
  lenient as their decoders: a lossy WebP (VP8) or JPEG 2000 stream has no checksum, so bytes
  overwritten in place decode to a different picture and cannot be told from a real one.

Conversions (what the model sees):
- EXIF orientation is applied, so the model sees the image as a viewer shows it (orientations 5
  to 8 swap width and height).
- Transparency (RGBA, LA, PA, palette or grayscale/RGB with a transparent colour) is composited
  over white.
- 16-bit grayscale (modes I;16*) is scaled to 8 bits (value * 255 / 65535, rounded). Mode I
  (32-bit integer, e.g. 16-bit PPM or integer TIFF) is read as 16-bit when a value exceeds 255,
  else as 8-bit; values outside the range are clipped.
- CMYK (e.g. JPEGs from print workflows) uses Pillow's CMYK -> RGB conversion; embedded ICC
  profiles are not applied. Other modes (1, L, P, YCbCr, LAB, HSV, F) use Pillow's conversion too.
- Animated images (GIF, WebP, APNG) and multi-page files (TIFF, MPO): the first frame.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from qwen25vl_embed_server.core.admission.limits import DEFAULT_MAX_PIXELS
from qwen25vl_embed_server.core.errors import InvalidInputError, LimitExceededError
from qwen25vl_embed_server.core.model.image_formats import ALLOWED_FORMATS

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})
# A transparent colour (PNG tRNS, GIF transparency index) in these modes; convert("RGBA") applies it.
_KEYED_TRANSPARENCY_MODES = frozenset({"1", "L", "P", "RGB"})

# What Pillow raises on malformed input. Seen by fuzzing (tests/core/test_fuzz.py and longer runs):
# OSError (UnidentifiedImageError and "truncated" included), SyntaxError, ValueError, and
# RuntimeError from the AVIF decoder. The others are raised by plugins' header parsing on short or
# inconsistent data. MemoryError is not here: it is the server's problem, not the request's.
_DECODER_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    RuntimeError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    ZeroDivisionError,
    OverflowError,
)


def decode_image(data: bytes, index: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image number ``index`` of a request into an RGB image (see the module docstring).

    Args:
        data: the encoded file.
        index: the image's position in the request, for error messages.
        max_pixels: the largest width x height accepted, checked on the header before decoding.

    Raises:
        InvalidInputError: empty, unsupported, corrupt or truncated data, or too many pixels; the
            message names the image index and the problem.
    """
    with _opened(data, index, max_pixels) as image:
        if image.format in _JPEG_FORMATS:
            _check_jpeg_scan(data, image.mode, index)
        image.load()
        # Some formats learn their final size while loading (e.g. a GIF frame larger than its
        # logical screen); check again before any further copy.
        _check_pixels(image, index, max_pixels)
        return to_rgb(ImageOps.exif_transpose(image))


def declared_size(data: bytes, index: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header alone, nothing decoded; refusals as :func:`decode_image`'s.
    (EXIF rotation may swap the two; the pixel count, which is what costs, stays.)"""
    with _opened(data, index, max_pixels) as image:
        return image.size


@contextmanager
def _opened(data: bytes, index: int, max_pixels: int) -> Iterator[Image.Image]:
    """The image opened (header read, size checked), Pillow's errors turned into ours."""
    if not data:
        raise InvalidInputError(f"image {index} is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
            _check_pixels(image, index, max_pixels)  # header only: nothing decoded yet
            yield image
    except InvalidInputError:
        raise
    except Image.DecompressionBombError as err:  # beyond Pillow's own hard limit, even at open()
        raise LimitExceededError(
            "max_pixels", f"image {index} is too large to decode: {err} (the limit is max_pixels={max_pixels})"
        ) from err
    except UnidentifiedImageError as err:
        raise InvalidInputError(
            f"image {index} could not be decoded: not a recognised image format ({len(data)} bytes; "
            f"supported: {', '.join(ALLOWED_FORMATS)})"
        ) from err
    except _DECODER_ERRORS as err:
        raise InvalidInputError(
            f"image {index} could not be decoded (corrupt or truncated?): {type(err).__name__}: {err}"
        ) from err


_JPEG_FORMATS = frozenset({"JPEG", "MPO"})


def _check_jpeg_scan(data: bytes, mode: str, index: int) -> None:
    """Refuse a JPEG whose entropy-coded data libjpeg can only read with warnings."""
    try:
        simplejpeg.decode_jpeg_header(data)
    except ValueError:
        # A layout TurboJPEG's API does not take (e.g. chroma-subsampled CMYK) that Pillow's
        # libjpeg decodes: only Pillow's own (lenient) checks apply to it.
        return
    try:
        simplejpeg.decode_jpeg(
            data,
            colorspace="CMYK" if mode == "CMYK" else "RGB",  # TurboJPEG cannot turn CMYK into RGB
            min_height=1,
            min_width=1,
            min_factor=8,
            strict=True,
        )
    except ValueError as err:
        # libjpeg's own words, e.g. "Corrupt JPEG data: premature end of data segment".
        raise InvalidInputError(f"image {index} could not be decoded (corrupt or truncated JPEG data): {err}") from err


def _check_pixels(image: Image.Image, index: int, max_pixels: int) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"image {index} declares an empty size {width}x{height}")
    pixels = width * height
    if pixels > max_pixels:
        raise LimitExceededError(
            "max_pixels", f"image {index} is {width}x{height} = {pixels} pixels; the limit is max_pixels={max_pixels}"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of ``image`` following the conversions in the module docstring."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        pixels = np.asarray(image)
        top = 65535 if image.mode in _SIXTEEN_BIT_MODES or pixels.max(initial=0) > 255 else 255
        gray = (pixels.astype(np.float64) * (255.0 / top)).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode in _KEYED_TRANSPARENCY_MODES and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
