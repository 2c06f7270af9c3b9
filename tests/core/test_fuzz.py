"""Property tests on hostile input: random bytes and mutated PNG/JPEG/GIF/WebP (and TIFF/BMP/AVIF) files.

decode_image and check_request must end every input in a result or an InvalidInputError, never
another exception and never a hang; through the real server, a mutated image must give OK or
INVALID_ARGUMENT, never INTERNAL or UNKNOWN. Examples are derandomized (the same inputs on every
run, for reproducible CI); run with ``--hypothesis-show-statistics`` to see the outcome counts.
"""

from __future__ import annotations

import concurrent.futures
import functools
import io
from collections.abc import Iterator
from typing import Any, Literal

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed.v1 import embed_pb2_grpc as pb_grpc
from qwen25vl_embed_server.core.admission.limits import Limits
from qwen25vl_embed_server.core.admission.request import check_request
from qwen25vl_embed_server.core.errors import InvalidInputError
from qwen25vl_embed_server.core.model.image_decoding import decode_image
from qwen25vl_embed_server.core.model.image_formats import ALLOWED_FORMATS
from qwen25vl_embed_server.rpc.harness import BackgroundServer
from qwen25vl_embed_server.rpc.messages import to_encoded

from ..helpers import noise_image

# Small enough that a header mutated to a large size costs little, large enough for every seed.
FUZZ_MAX_PIXELS = 1 << 22
HANG_SECONDS = 20.0

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:PIL.*",  # e.g. "Corrupt EXIF data"
    "ignore::PIL.Image.DecompressionBombWarning",  # Pillow's own notice at open(); we refuse such sizes anyway
)


def _encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


@functools.cache
def seeds() -> dict[str, tuple[bytes, ...]]:
    """Small valid files of each family, with the features whose parsers we want to reach."""
    rgb = noise_image(24, 16, seed=7)
    rgba = Image.fromarray(np.dstack([np.asarray(rgb), np.full((16, 24), 128, np.uint8)]), "RGBA")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    frames = [rgb, rgb.transpose(Image.Transpose.ROTATE_180)]
    exif = Image.Exif()
    exif[0x0112] = 6
    animated: dict[str, Any] = {"save_all": True, "append_images": frames[1:], "duration": 50, "loop": 0}
    return {
        "png": (
            _encode(rgb, "PNG"),
            _encode(palette, "PNG", transparency=0),
            _encode(rgba, "PNG"),
            _encode(Image.fromarray(np.arange(384, dtype=np.uint16).reshape(16, 24) * 170), "PNG"),
            _encode(rgb, "PNG", exif=exif.tobytes()),
            _encode(frames[0], "PNG", **animated),
        ),
        "jpeg": (
            _encode(rgb, "JPEG", exif=exif.tobytes()),
            _encode(rgb.convert("CMYK"), "JPEG"),
            _encode(rgb.convert("L"), "JPEG", progressive=True),
        ),
        "gif": (_encode(frames[0], "GIF", **animated), _encode(palette, "GIF", transparency=0)),
        "webp": (_encode(frames[0], "WEBP", **animated), _encode(rgba, "WEBP", lossless=True)),
        "other": (
            _encode(rgb, "TIFF", compression="tiff_lzw"),
            _encode(rgba, "TIFF"),
            _encode(rgb, "BMP"),
            *((_encode(rgb, "AVIF"),) if "AVIF" in ALLOWED_FORMATS else ()),
        ),
    }


MAGICS = (
    b"\x89PNG\r\n\x1a\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    b"\xff\xd8\xff\xe0",
    b"\xff\xd8\xff\xe1",
    b"GIF89a",
    b"GIF87a",
    b"RIFF\x00\x01\x00\x00WEBPVP8 ",
    b"RIFF\x00\x01\x00\x00WEBPVP8X",
    b"II*\x00",
    b"MM\x00*",
    b"BM",
    b"P6\n",
    b"P5\n",
    b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf",
)
BOUNDARY_INTS = (0, 1, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF)


@st.composite
def mutated(draw: st.DrawFn, family: str | None = None, fewest: int = 1) -> bytes:
    """A seed file with ``fewest`` to 4 mutations: bit flips (anywhere, or in the header), byte and integer
    overwrites, truncation, insertion, deletion, duplication, and splices of another seed."""
    everything = [data for files in seeds().values() for data in files]
    data = bytearray(draw(st.sampled_from(seeds()[family] if family else everything)))
    for _ in range(draw(st.integers(fewest, 4))):
        kind = draw(st.sampled_from(["flip", "header", "byte", "int", "truncate", "insert", "delete", "dup", "splice"]))
        size = len(data)
        if size == 0:
            data += draw(st.binary(min_size=1, max_size=16))
            continue
        position = draw(st.integers(0, size - 1))
        if kind == "header":
            position = min(position, 63, size - 1)
        if kind in ("flip", "header"):
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[position] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]) | st.integers(0, 255))
        elif kind == "int":
            width = draw(st.sampled_from([2, 4]))
            order: Literal["big", "little"] = draw(st.sampled_from(["big", "little"]))
            value = draw(st.sampled_from(BOUNDARY_INTS)) & ((1 << (8 * width)) - 1)
            data[position : position + width] = value.to_bytes(width, order)
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=32))
        elif kind == "delete":
            del data[position : position + draw(st.integers(1, 64))]
        elif kind == "dup":
            data[position:position] = data[position : position + draw(st.integers(1, 256))]
        else:
            other = draw(st.sampled_from(everything))
            start = draw(st.integers(0, len(other) - 1))
            data[position:] = other[start : start + draw(st.integers(1, len(other)))]
    return bytes(data)


@pytest.fixture(scope="module")
def worker() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    """Runs each decode, so that a hang fails the test instead of stalling it."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuzz") as pool:
        yield pool


def decode_outcome(pool: concurrent.futures.ThreadPoolExecutor, data: bytes) -> str:
    """'decoded' or 'invalid'; any other exception propagates, a hang fails."""
    future = pool.submit(decode_image, data, 0, FUZZ_MAX_PIXELS)
    try:
        image = future.result(timeout=HANG_SECONDS)
    except InvalidInputError as err:
        message = str(err)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"decode_image hung on {len(data)} bytes: {data[:64]!r}...")
    else:
        assert image.mode == "RGB"
        assert 0 < image.width * image.height <= FUZZ_MAX_PIXELS
        return "decoded"
    assert message.startswith("image 0 "), message
    return "invalid"


@settings(FUZZ, max_examples=600)
@given(data=st.binary(max_size=4096))
def test_random_bytes(worker: concurrent.futures.ThreadPoolExecutor, data: bytes) -> None:
    event(decode_outcome(worker, data))


@settings(FUZZ, max_examples=400)
@given(magic=st.sampled_from(MAGICS), tail=st.binary(max_size=1024))
def test_random_bytes_behind_a_magic_number(
    worker: concurrent.futures.ThreadPoolExecutor, magic: bytes, tail: bytes
) -> None:
    event(decode_outcome(worker, magic + tail))


@pytest.mark.parametrize("family", ["png", "jpeg", "gif", "webp", "other"])
@settings(FUZZ, max_examples=400)
@given(data=st.data())
def test_mutated_files(worker: concurrent.futures.ThreadPoolExecutor, family: str, data: st.DataObject) -> None:
    event(decode_outcome(worker, data.draw(mutated(family), label="file")))


def test_unmutated_seeds_decode(worker: concurrent.futures.ThreadPoolExecutor) -> None:
    for files in seeds().values():
        for data in files:
            assert decode_outcome(worker, data) == "decoded"


# -- check_request --------------------------------------------------------------------------

FUZZ_LIMITS = Limits(max_images=6, max_image_bytes=200, max_prompt_tokens=2)


@settings(FUZZ, max_examples=500)
@given(
    sizes=st.lists(st.integers(0, 260), max_size=9),
    prompt=st.none() | st.text(max_size=80),
)
def test_check_request_refuses_exactly_what_exceeds_a_limit(sizes: list[int], prompt: str | None) -> None:
    request = pb.ImageRequest(images=[pb.Image(data=b"\xab" * size) for size in sizes])
    if prompt is not None:
        request.prompt = prompt
    expected = (
        "neither an image nor a prompt"
        if not sizes and prompt is None
        else "images; the limit"
        if len(sizes) > FUZZ_LIMITS.max_images
        else "bytes; the limit"
        if max(sizes, default=0) > FUZZ_LIMITS.max_image_bytes
        else "characters; the limit"
        if prompt is not None and len(prompt) > FUZZ_LIMITS.max_prompt_chars
        else None
    )
    refusal = None
    try:
        check_request(to_encoded(request), FUZZ_LIMITS)
    except InvalidInputError as err:
        refusal = str(err)
    event("passed" if refusal is None else "refused")
    if expected is None:
        assert refusal is None
    else:
        assert refusal is not None
        assert expected in refusal, (expected, refusal)


@st.composite
def mutated_request_bytes(draw: st.DrawFn) -> bytes:
    """A serialized valid request with a few byte-level mutations (most still parse)."""
    request = pb.ImageRequest(
        images=[pb.Image(data=b"\x01" * draw(st.integers(0, 300)), mime_type="image/png") for _ in range(3)],
        prompt=draw(st.text(max_size=40)),
        outputs=["lm_pooled_mean"],
        request_id="r",
    )
    data = bytearray(request.SerializeToString())
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, len(data) - 1))
        if draw(st.booleans()):
            data[position] ^= 1 << draw(st.integers(0, 7))
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@settings(FUZZ, max_examples=300)
@given(data=mutated_request_bytes())
def test_check_request_on_mutated_messages(data: bytes) -> None:
    try:
        request = pb.ImageRequest.FromString(data)
    except Exception:  # gRPC answers unparsable requests itself, before any of our code
        event("unparsable")
        return
    try:
        check_request(to_encoded(request), FUZZ_LIMITS)
        event("passed")
    except InvalidInputError:
        event("refused")


# -- through the real server ----------------------------------------------------------------

ALLOWED_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


@pytest.fixture(scope="module")
def stub(server: BackgroundServer) -> Iterator[pb_grpc.EmbeddingServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.EmbeddingServiceStub(channel)


@settings(FUZZ, max_examples=150)
@given(data=mutated(fewest=0))  # some unmutated, so that the OK path runs too
def test_mutated_images_through_the_server(stub: pb_grpc.EmbeddingServiceStub, data: bytes) -> None:
    request = pb.ImageRequest(images=[pb.Image(data=data)], outputs=["lm_pooled_mean", "vision_pooled_mean"])
    responses: list[pb.EmbeddingResponse] = []
    code, details = grpc.StatusCode.OK, ""
    try:
        responses = list(stub.Extract(request, timeout=HANG_SECONDS))
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.OK:
        assert responses[0].HasField("metadata")
    event(code.name)
    assert code in ALLOWED_CODES, f"{code.name}: {details} for {len(data)} bytes {data[:48]!r}"
