"""Request limits: the checks' messages, gRPC's request-size limit, the serve flags, and the
processor's own refusals (tiny and extreme images) surfacing as clean InvalidInputErrors."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from PIL import Image

from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed.v1 import embed_pb2_grpc as pb_grpc
from qwen25vl_embed_server.cli import app as cli
from qwen25vl_embed_server.cli.commands import server_config
from qwen25vl_embed_server.core.admission.limits import PROMPT_CHARS_PER_TOKEN, Limits
from qwen25vl_embed_server.core.admission.request import (
    RESERVED_PROMPT_TOKENS,
    EncodedRequest,
    check_prompt_tokens,
    check_request,
)
from qwen25vl_embed_server.core.errors import InvalidInputError, LimitExceededError
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.image_decoding import decode_image
from qwen25vl_embed_server.core.model.loading import LoadedModel
from qwen25vl_embed_server.ray.deployment import EmbedderSettings
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import noise_image, png_bytes

MIB = 1 << 20


def request(*sizes: int, prompt: str | None = None) -> EncodedRequest:
    return EncodedRequest(images=[b"\x00" * size for size in sizes], prompt=prompt)


def message(*sizes: int) -> pb.ImageRequest:
    return pb.ImageRequest(images=[pb.Image(data=b"\x00" * size) for size in sizes])


def test_defaults() -> None:
    limits = Limits()
    assert limits.max_request_bytes == 64 * MIB
    assert limits.max_images == 16
    assert limits.max_image_bytes == 20 * MIB
    assert limits.max_pixels == 50_000_000
    assert limits.max_prompt_tokens == 8192
    assert limits.max_prompt_chars == 8192 * PROMPT_CHARS_PER_TOKEN


@pytest.mark.parametrize(
    "field", ["max_request_bytes", "max_images", "max_image_bytes", "max_pixels", "max_prompt_tokens"]
)
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_limits_must_be_positive_integers(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        Limits(**{field: value})  # type: ignore[arg-type]


def test_a_request_within_the_limits_passes() -> None:
    limits = Limits(max_images=3, max_image_bytes=100, max_prompt_tokens=1)
    check_request(request(100, 1, 50), limits)
    check_request(request(1, prompt="x" * PROMPT_CHARS_PER_TOKEN), limits)
    check_request(request(1, prompt=""), limits)


def test_too_many_images() -> None:
    with pytest.raises(InvalidInputError, match=r"^request has 20 images; the limit is max_images=16$"):
        check_request(request(*[1] * 20), Limits())


def test_neither_image_nor_prompt() -> None:
    with pytest.raises(InvalidInputError, match="neither an image nor a prompt"):
        check_request(request(), Limits())


def test_image_too_large_names_its_index() -> None:
    with pytest.raises(InvalidInputError, match=r"^image 2 is 101 bytes; the limit is max_image_bytes=100$"):
        check_request(request(1, 100, 101, 1000), Limits(max_image_bytes=100))


def test_prompt_too_long_in_characters_is_refused_without_tokenizing() -> None:
    limits = Limits(max_prompt_tokens=2)
    with pytest.raises(InvalidInputError, match=r"prompt has 65 characters; the limit is 64 .*max_prompt_tokens=2"):
        check_request(request(1, prompt="x" * 65), limits)


def test_prompt_tokens_are_counted_with_the_model_tokenizer(loaded: LoadedModel) -> None:
    tokenizer = loaded.processor.tokenizer
    prompt = "Compare the images, please."
    count = len(tokenizer.encode(prompt, add_special_tokens=False))
    assert count > 5
    assert check_prompt_tokens(tokenizer, prompt, Limits(max_prompt_tokens=count)) == count
    assert check_prompt_tokens(tokenizer, "", Limits(max_prompt_tokens=1)) == 0
    with pytest.raises(
        InvalidInputError,
        match=rf"^prompt has {count} tokens; the limit is max_prompt_tokens={count - 1}$",
    ):
        check_prompt_tokens(tokenizer, prompt, Limits(max_prompt_tokens=count - 1))


@pytest.mark.parametrize("token", RESERVED_PROMPT_TOKENS)
def test_image_placeholder_tokens_in_the_prompt_are_refused(loaded: LoadedModel, token: str) -> None:
    with pytest.raises(InvalidInputError, match="reserved for images and videos"):
        check_prompt_tokens(loaded.processor.tokenizer, f"look: {token} here", Limits())


def test_the_core_names_the_limit_and_each_edge_adds_how_to_set_it() -> None:
    with pytest.raises(LimitExceededError) as caught:
        check_request(request(*[1] * 20), Limits())
    assert caught.value.limit == "max_images"
    serve = server_config(cli.build_parser().parse_args(["serve"])).service.pipeline.limit_hints
    assert str(caught.value.with_hint(serve)).endswith("the limit is max_images=16 (set with --max-images)")
    ray = EmbedderSettings().service_config().pipeline.limit_hints
    assert "--" not in str(caught.value.with_hint(ray))  # Ray users have no flags
    assert "limits.max_images" in str(caught.value.with_hint(ray))
    assert caught.value.with_hint({}) is caught.value  # bulk and in-process: no hint


def test_pixel_limit_names_the_limit() -> None:
    with pytest.raises(LimitExceededError, match=r"the limit is max_pixels=100$"):
        decode_image(png_bytes(noise_image(11, 10)), max_pixels=100)


def test_request_size_is_enforced_by_grpc(tiny_server: Callable[..., BackgroundServer]) -> None:
    with (
        tiny_server(limits=Limits(max_request_bytes=1 * MIB)) as small,
        grpc.insecure_channel(small.address) as channel,
    ):
        stub = pb_grpc.EmbeddingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Extract(message(2 * MIB), timeout=30))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Just under the limit the request is read: this one is then refused for its content.
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Extract(message(MIB - 100), timeout=30))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_serve_flags_set_the_limits() -> None:
    args = cli.build_parser().parse_args(
        [
            "serve",
            "--max-request-bytes=1000000",
            "--max-images=3",
            "--max-image-bytes=5000",
            "--max-image-pixels=7000",
            "--max-prompt-tokens=9",
        ]
    )
    config = server_config(args)
    assert config.service.pipeline.limits == Limits(
        max_request_bytes=1_000_000, max_images=3, max_image_bytes=5000, max_pixels=7000, max_prompt_tokens=9
    )
    assert server_config(cli.build_parser().parse_args(["serve"])).service.pipeline.limits == Limits()


def test_serve_refuses_a_bad_limit(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--max-images=0"]) == 2
    assert capsys.readouterr().err == "error: --max-images must be at least 1, got 0\n"


# -- what the processor does with tiny and extreme images ------------------------------------


def test_one_pixel_image_is_upscaled_not_refused(extractor: Extractor) -> None:
    # The processor resizes up to min_pixels: a 1x1 image becomes the smallest grid (56x56 px).
    result = extractor.extract([decode_image(png_bytes(Image.new("RGB", (1, 1), (9, 9, 9))))])
    assert result.image_grid_thw.tolist() == [[1, 4, 4]]


@pytest.mark.parametrize("size", [(10000, 20), (20, 10000)])
def test_extreme_aspect_ratio_is_a_clean_invalid_input(extractor: Extractor, size: tuple[int, int]) -> None:
    image = decode_image(png_bytes(Image.new("RGB", size)))
    with pytest.raises(InvalidInputError, match=r"processor rejected .*aspect ratio must be smaller than 200"):
        extractor.extract([image])
