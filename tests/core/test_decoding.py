"""decode_image: every mode and format quirk the model may be sent, bombs, and broken files."""

from __future__ import annotations

import io
import struct
import time
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image

from qwen25vl_embed_server.core.admission.limits import DEFAULT_MAX_PIXELS
from qwen25vl_embed_server.core.errors import InvalidInputError
from qwen25vl_embed_server.core.model.image_decoding import decode_image
from qwen25vl_embed_server.core.model.image_formats import ALLOWED_FORMATS

from ..helpers import noise_image, png_bytes

RED, BLUE, GREEN, YELLOW = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0)


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int32)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)


def quadrants(width: int, height: int) -> Image.Image:
    """Top-left red, top-right blue, bottom-left green, bottom-right yellow: any rotation shows."""
    image = Image.new("RGB", (width, height))
    half_w, half_h = width // 2, height // 2
    for colour, box in (
        (RED, (0, 0, half_w, half_h)),
        (BLUE, (half_w, 0, width, half_h)),
        (GREEN, (0, half_h, half_w, height)),
        (YELLOW, (half_w, half_h, width, height)),
    ):
        image.paste(colour, box)
    return image


def corner_colours(image: Image.Image) -> list[tuple[int, ...]]:
    """Colours near the top-left, top-right, bottom-left, bottom-right corners."""
    w, h = image.size
    return [tuple(image.getpixel((x, y))) for x, y in ((2, 2), (w - 3, 2), (2, h - 3), (w - 3, h - 3))]  # type: ignore[arg-type]


def assert_close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> None:
    assert max(abs(a - e) for a, e in zip(actual, expected, strict=True)) <= tolerance, (actual, expected)


# -- modes -----------------------------------------------------------------------------------


def test_rgb_png_is_returned_exactly() -> None:
    image = noise_image(31, 17)
    out = decode_image(png_bytes(image))
    np.testing.assert_array_equal(pixels(out), np.asarray(image))


def test_grayscale_becomes_equal_rgb_channels() -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = decode_image(png_bytes(Image.fromarray(gray)))
    assert out.size == (8, 8)
    for channel in range(3):
        np.testing.assert_array_equal(pixels(out)[..., channel], gray)


def test_palette_without_transparency_keeps_its_colours() -> None:
    image = noise_image(16, 12).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    data = png_bytes(image)
    assert Image.open(io.BytesIO(data)).mode == "P"
    np.testing.assert_array_equal(pixels(decode_image(data)), np.asarray(image.convert("RGB")))


def test_palette_transparency_is_composited_over_white() -> None:
    image = Image.new("P", (4, 2))
    image.putpalette([0, 0, 0, *RED, *BLUE] + [0] * (256 - 3) * 3)
    image.putdata([0, 1, 2, 0, 1, 1, 2, 2])
    data = encode(image, "PNG", transparency=0)
    out = decode_image(data)
    assert out.getpixel((0, 0)) == (255, 255, 255)  # index 0 (black) is transparent
    assert out.getpixel((3, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == RED
    assert out.getpixel((2, 0)) == BLUE


def test_rgba_is_composited_over_white() -> None:
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 10, 10, 0)  # fully transparent: white
    rgba[0, 1] = (200, 10, 10, 255)  # opaque: itself
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black: mid grey
    out = pixels(decode_image(png_bytes(Image.fromarray(rgba, "RGBA"))))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (200, 10, 10)
    assert all(abs(int(v) - 127) <= 1 for v in out[0, 2])


def test_la_is_composited_over_white() -> None:
    la = np.array([[[0, 0], [0, 255], [100, 128]]], dtype=np.uint8)
    out = pixels(decode_image(png_bytes(Image.fromarray(la, "LA"))))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (0, 0, 0)
    assert all(abs(int(v) - 177) <= 1 for v in out[0, 2])  # 100 * 128/255 + 255 * 127/255


def test_rgb_with_a_transparent_colour_key_is_composited() -> None:
    image = Image.new("RGB", (2, 1), RED)
    image.putpixel((1, 0), BLUE)
    out = decode_image(encode(image, "PNG", transparency=BLUE))
    assert out.getpixel((0, 0)) == RED
    assert out.getpixel((1, 0)) == (255, 255, 255)


def test_16_bit_grayscale_png_is_scaled_to_8_bits() -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    data = png_bytes(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = pixels(decode_image(data))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_mode_i_16_bit_values_are_scaled_and_8_bit_values_kept() -> None:
    # A 16-bit PGM opens in mode I (32-bit integers) holding 16-bit values.
    sixteen = b"P5\n4 1\n65535\n" + np.array([0, 257, 32768, 65535], dtype=">u2").tobytes()
    assert Image.open(io.BytesIO(sixteen)).mode == "I"
    np.testing.assert_array_equal(pixels(decode_image(sixteen))[0, :, 1], [0, 1, 128, 255])
    # Mode I with values <= 255 (an integer TIFF) is read as 8-bit.
    eight = encode(Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32)), "TIFF")
    assert Image.open(io.BytesIO(eight)).mode == "I"
    np.testing.assert_array_equal(pixels(decode_image(eight))[0, :, 0], [0, 100, 255])


def test_cmyk_jpeg_has_correct_colours() -> None:
    source = quadrants(32, 32)
    data = encode(source.convert("CMYK"), "JPEG", quality=95)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "CMYK"
    out = decode_image(data)
    # Exactly Pillow's own CMYK -> RGB conversion of the decoded file ...
    np.testing.assert_array_equal(pixels(out), np.asarray(opened.convert("RGB")))
    # ... which gives back the colours that went in (not inverted, not channel-swapped).
    for actual, expected in zip(corner_colours(out), [RED, BLUE, GREEN, YELLOW], strict=True):
        assert_close(actual, expected)


# -- EXIF orientation ------------------------------------------------------------------------


def with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.mark.parametrize(
    ("orientation", "expected_corners"),
    [
        # 6: the camera was turned clockwise; the viewer rotates 90 degrees clockwise.
        (6, [GREEN, RED, YELLOW, BLUE]),
        # 8: turned counter-clockwise; the viewer rotates 90 degrees counter-clockwise.
        (8, [BLUE, YELLOW, RED, GREEN]),
    ],
)
def test_exif_rotated_jpeg_is_turned_upright(orientation: int, expected_corners: list[tuple[int, int, int]]) -> None:
    source = quadrants(48, 32)
    data = encode(source, "JPEG", quality=95, exif=with_orientation(orientation))
    raw = Image.open(io.BytesIO(data))
    assert raw.size == (48, 32)
    assert raw.getexif()[0x0112] == orientation
    out = decode_image(data)
    assert out.size == (32, 48)  # width and height swapped
    for actual, expected in zip(corner_colours(out), expected_corners, strict=True):
        assert_close(actual, expected)


@pytest.mark.parametrize(
    ("orientation", "transpose"),
    [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)],
)
def test_exif_rotation_moves_every_pixel(orientation: int, transpose: Image.Transpose) -> None:
    source = noise_image(20, 12)
    out = decode_image(encode(source, "PNG", exif=with_orientation(orientation)))
    np.testing.assert_array_equal(pixels(out), np.asarray(source.transpose(transpose)))


# -- animations ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animation_gives_its_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (8, 6), colour) for colour in (RED, BLUE, GREEN)]
    params: dict[str, Any] = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    out = decode_image(data)
    assert out.size == (8, 6)
    assert (pixels(out) == RED).all()


# -- sizes -----------------------------------------------------------------------------------


def test_one_pixel_image() -> None:
    out = decode_image(png_bytes(Image.new("RGB", (1, 1), (1, 2, 3))))
    assert out.size == (1, 1)
    assert out.getpixel((0, 0)) == (1, 2, 3)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    # A VALID 8000x8000 1-bit PNG (64 M pixels, 192 MB as RGB) that fits in a few kB.
    width = height = 8000
    row = b"\x00" + bytes(width // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    bomb = png_header(width, height, bit_depth=1, color_type=0) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    assert len(bomb) < 200_000
    assert Image.open(io.BytesIO(bomb)).size == (width, height)  # really that size
    start = time.perf_counter()
    with pytest.raises(InvalidInputError) as caught:
        decode_image(bomb, index=3)
    assert time.perf_counter() - start < 0.5  # nothing was decoded
    message = str(caught.value)
    assert message.startswith("image 3 ")
    assert f"{width * height}" in message
    assert f"the limit is max_pixels={DEFAULT_MAX_PIXELS}" in message


def test_declared_size_is_checked_against_the_given_limit() -> None:
    data = png_bytes(noise_image(100, 100))
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(InvalidInputError, match=r"image 1 is 100x100 = 10000 pixels; the limit is max_pixels=9999"):
        decode_image(data, index=1, max_pixels=9_999)


@pytest.mark.parametrize("side", [100_000, 30_000])
def test_huge_declared_size_header_only(side: int) -> None:
    # 10^10 pixels is beyond Pillow's own hard limit (refused inside Image.open); 9 * 10^8 is ours.
    header = png_header(side, side) + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b"")
    with pytest.raises(InvalidInputError, match=r"^image 0 is too large|^image 0 is 30000x30000"):
        decode_image(header)


# -- broken input ----------------------------------------------------------------------------


def sample_files() -> dict[str, bytes]:
    image = noise_image(40, 30)
    return {
        "png": png_bytes(image),
        "jpeg": encode(image, "JPEG"),
        "gif": encode(image, "GIF"),
        "webp": encode(image, "WEBP"),
        "tiff": encode(image, "TIFF"),
        "bmp": encode(image, "BMP"),
    }


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
@pytest.mark.parametrize("fmt", sorted(sample_files()))
def test_truncated_files_are_invalid_input(fmt: str) -> None:
    data = sample_files()[fmt]
    assert decode_image(data).size == (40, 30)
    # Cut inside the pixel data, and inside the header. (A cut after the last pixel, e.g. of a PNG's
    # IEND or a GIF's trailer, may decode: every pixel is there.)
    for cut in (len(data) // 2, len(data) // 3, 12):
        with pytest.raises(InvalidInputError, match=r"^image 2 could not be decoded"):
            decode_image(data[:cut], index=2)


@pytest.mark.parametrize(
    "data",
    [
        b"hello, world",
        bytes(range(256)) * 4,
        b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>",
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",  # EPS: Pillow would run Ghostscript
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff",
    ],
)
def test_non_image_bytes_are_invalid_input(data: bytes) -> None:
    with pytest.raises(InvalidInputError, match=r"^image 5 could not be decoded"):
        decode_image(data, index=5)


def test_formats_outside_the_allow_list_are_refused() -> None:
    data = encode(noise_image(16, 16), "ICO")
    assert Image.open(io.BytesIO(data)).format == "ICO"  # Pillow itself would open it
    assert "ICO" not in ALLOWED_FORMATS
    with pytest.raises(InvalidInputError, match=r"not a recognised image format .*supported: PNG, JPEG"):
        decode_image(data)


def test_empty_bytes_are_invalid_input() -> None:
    with pytest.raises(InvalidInputError, match=r"^image 4 is empty"):
        decode_image(b"", index=4)


# -- entropy-coded data that libjpeg would pad (it warns; Pillow hides the warning) -------------


def scan_start(data: bytes) -> int:
    """Offset just after the first SOS segment's header: where entropy-coded data begins."""
    sos = data.index(b"\xff\xda")
    (length,) = struct.unpack(">H", data[sos + 2 : sos + 4])
    return int(sos + 2 + length)


def broken_jpegs() -> dict[str, bytes]:
    image = noise_image(64, 48)
    baseline = encode(image, "JPEG", quality=90)
    progressive = encode(image, "JPEG", quality=90, progressive=True)
    cmyk = encode(image.convert("CMYK"), "JPEG", quality=90)
    start, middle = scan_start(baseline), (scan_start(baseline) + len(baseline)) // 2
    return {
        "cut, end marker added": baseline[:middle] + b"\xff\xd9",
        "progressive cut, end marker added": progressive[: len(progressive) * 2 // 3] + b"\xff\xd9",
        "progressive, first scan cut": progressive[: (scan_start(progressive) + len(progressive)) // 4] + b"\xff\xd9",
        "zeroed bytes mid-scan": baseline[:middle] + bytes(64) + baseline[middle + 64 :],
        "zeroed start of scan": baseline[:start] + bytes(32) + baseline[start + 32 :],
        "cmyk cut, end marker added": cmyk[: (scan_start(cmyk) + len(cmyk)) // 2] + b"\xff\xd9",
    }


@pytest.mark.parametrize("case", sorted(broken_jpegs()))
def test_corrupt_jpeg_scans_are_invalid_input(case: str) -> None:
    data = broken_jpegs()[case]
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # what made this a bug: Pillow alone "decodes" it, gray-padded
    with pytest.raises(InvalidInputError, match=r"^image 3 could not be decoded \(corrupt or truncated JPEG data\)"):
        decode_image(data, index=3)


@pytest.mark.parametrize("params", [{}, {"progressive": True}, {"quality": 30, "subsampling": 2}, {"optimize": True}])
def test_intact_jpegs_still_decode(params: dict[str, Any]) -> None:
    image = noise_image(64, 48)
    for source in (image, image.convert("L"), image.convert("CMYK")):
        data = encode(source, "JPEG", **params)
        assert decode_image(data + b"trailing bytes after the end marker").size == (64, 48)


def test_other_formats_with_broken_compressed_data_are_invalid_input() -> None:
    image = noise_image(64, 48)
    png = png_bytes(image)
    idat = png.index(b"IDAT") + 4
    middle = (idat + len(png)) // 2
    gif = encode(image, "GIF")
    cases = {
        "png zeroed inside IDAT": png[:middle] + bytes(64) + png[middle + 64 :],
        "png cut, IEND added": png[:middle] + png_chunk(b"IEND", b""),
        "gif cut, trailer added": gif[: len(gif) // 2] + b"\x3b",
        "webp cut": encode(image, "WEBP")[:200],
    }
    for case, data in cases.items():
        with pytest.raises(InvalidInputError, match=r"^image 0 could not be decoded"):
            decode_image(data)
        assert case
