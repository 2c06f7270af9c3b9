"""The gRPC surface: wire dtypes, chunking under default limits, errors, health, reflection, info."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import ml_dtypes
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from qwen25vl_embed import EmbeddingClient, EmbeddingError
from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed.v1 import embed_pb2_grpc as pb_grpc
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.image_decoding import decode_image
from qwen25vl_embed_server.rpc.harness import BackgroundServer
from qwen25vl_embed_server.rpc.server import ServerConfig

from ..helpers import assert_batched_close, noise_image, png_bytes

FOUR_MIB = 4 << 20


@pytest.fixture(scope="module")
def stub(server: BackgroundServer) -> Iterator[pb_grpc.EmbeddingServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.EmbeddingServiceStub(channel)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_every_wire_dtype_round_trips(full_width_client: EmbeddingClient, dtype: str) -> None:
    image = png_bytes(noise_image(200, 150))
    outputs = ["vision_tokens", "lm_last_hidden", "lm_pooled_mean", "visual_token_lens"]
    # Two runs of one request, both on all of the model's threads: the same float32 values.
    full = full_width_client.extract(image, outputs=outputs)
    half = full_width_client.extract(image, outputs=outputs, dtype=dtype)
    expected_type = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    for name in ("vision_tokens", "lm_last_hidden", "lm_pooled_mean"):
        assert full[name].dtype == np.float32
        assert half[name].dtype == np.dtype(expected_type)
        np.testing.assert_array_equal(half[name], full[name].astype(expected_type))
        assert half[name].nbytes * 2 == full[name].nbytes
    assert half["visual_token_lens"].dtype == np.int64


def test_tensor_over_4_mib_arrives_whole_with_default_limits(
    full_width_client: EmbeddingClient, full_width_server: BackgroundServer, extractor: Extractor
) -> None:
    # 16 images (the default limit) of 476x448 -> 16 * 34 * 32 patches of 64 fp32 channels = 4.5 MB.
    images = [png_bytes(noise_image(476, 448, seed=i)) for i in range(16)]
    result = full_width_client.extract(images, outputs=["vision_tokens"])["vision_tokens"]
    assert result.nbytes > FOUR_MIB
    # The same request's messages as they cross the wire, each within the 1 MiB default chunk size;
    # their parts, put at their offsets by hand, are the SDK's array byte for byte.
    request = pb.ImageRequest(images=[pb.Image(data=b) for b in images], outputs=["vision_tokens"])
    with grpc.insecure_channel(full_width_server.address) as channel:
        responses = list(pb_grpc.EmbeddingServiceStub(channel).Extract(request))
    assert len(responses) > 5
    assert max(response.ByteSize() for response in responses) <= 1 << 20
    whole = bytearray(result.nbytes)
    for part in (tensor for response in responses for tensor in response.tensors if tensor.name == "vision_tokens"):
        whole[part.offset : part.offset + len(part.data)] = part.data
    assert bytes(whole) == result.tobytes()
    # And they are the model's: the server runs the tower over a few images at a time (a large
    # request goes in pieces), so against the whole request run at once, within float rounding.
    decoded = [decode_image(data) for data in images]
    direct = extractor.extract(decoded, plan=extractor.plan(["vision_tokens"])).tensors["vision_tokens"]
    assert_batched_close(result, direct, "vision_tokens")


def test_configured_chunk_size_is_respected(tiny_server: Callable[..., BackgroundServer]) -> None:
    chunk = 64 << 10
    request = pb.ImageRequest(
        images=[pb.Image(data=png_bytes(noise_image(448, 448)))],
        outputs=["vision_tokens", "projected_tokens", "lm_last_hidden", "lm_pooled_mean"],
        request_id="r-1",
    )
    with tiny_server(chunk_bytes=chunk) as small, grpc.insecure_channel(small.address) as channel:
        responses = list(pb_grpc.EmbeddingServiceStub(channel).Extract(request))
        with EmbeddingClient(small.address) as sdk:
            via_sdk = sdk.extract(request.images[0].data, outputs=list(request.outputs))
    assert max(r.ByteSize() for r in responses) <= chunk
    assert all(r.request_id == "r-1" for r in responses)
    assert responses[0].HasField("metadata")
    assert not any(r.HasField("metadata") for r in responses[1:])
    assert via_sdk["vision_tokens"].shape == (1024, 64)


BAD_IMAGES = {
    "empty": (b"", "image 0 is empty"),
    "not an image": (b"hello, this is text", "not a recognised image format"),
    "truncated png": (png_bytes(noise_image(64, 64))[:200], "could not be decoded"),
    "corrupt png": (png_bytes(noise_image(64, 64))[:40] + bytes(range(256)) * 4, "could not be decoded"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES), ids=list(BAD_IMAGES))
def test_bad_images_get_invalid_argument_and_the_server_keeps_serving(
    stub: pb_grpc.EmbeddingServiceStub, client: EmbeddingClient, case: str
) -> None:
    data, message = BAD_IMAGES[case]
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Extract(pb.ImageRequest(images=[pb.Image(data=data)])))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in str(raised.value.details())
    assert client.extract(png_bytes(noise_image(56, 56))).visual_token_lens.tolist() == [4]


def test_sdk_raises_one_error_type_with_the_status_code(client: EmbeddingClient) -> None:
    with pytest.raises(EmbeddingError) as raised:
        client.extract(b"GIF89a but not really")
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 0 could not be decoded" in raised.value.details
    with pytest.raises(ValueError, match="empty"):  # caught before any RPC
        client.extract(b"")


def test_second_bad_image_is_named_by_index(stub: pb_grpc.EmbeddingServiceStub) -> None:
    good = pb.Image(data=png_bytes(noise_image(56, 56)))
    with pytest.raises(grpc.RpcError, match="image 1 is empty"):
        list(stub.Extract(pb.ImageRequest(images=[good, pb.Image(data=b"")])))


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.ImageRequest(outputs=["visual_token_lens"]), "neither an image nor a prompt"),
        (pb.ImageRequest(prompt="a text", outputs=["visual_token_lens"]), "no image, so it has no visual_token_lens"),
        (pb.ImageRequest(images=[pb.Image(data=b"x")], outputs=["nope"]), "unknown output 'nope'"),
        (pb.ImageRequest(images=[pb.Image(data=b"x")], outputs=["lm_layer_9"]), "out of range"),
        (pb.ImageRequest(images=[pb.Image(data=b"x")], dtype=pb.DTYPE_INT64), "floating-point"),
        (pb.ImageRequest(images=[pb.Image(data=b"x")], dtype=99), "floating-point"),  # type: ignore[arg-type]
        (pb.ImageRequest(images=[pb.Image(data=b"x")], request_id="r" * 300), "request_id"),
    ],
    ids=[
        "no image or prompt",
        "image output of a text",
        "unknown output",
        "layer out of range",
        "int64 dtype",
        "unknown dtype",
        "long request id",
    ],
)
def test_bad_requests_get_invalid_argument(
    stub: pb_grpc.EmbeddingServiceStub, request_: pb.ImageRequest, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Extract(request_))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in str(raised.value.details())


def test_health_reports_serving(server: BackgroundServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "qwen25vl_embed.v1.EmbeddingService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(server: BackgroundServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(replies).list_services_response.service}
    assert "qwen25vl_embed.v1.EmbeddingService" in names
    assert "grpc.health.v1.Health" in names


def test_info_describes_the_model(client: EmbeddingClient) -> None:
    info = client.info()
    assert (info.vision_hidden_size, info.hidden_size) == (64, 64)
    assert (info.patch_size, info.spatial_merge_size, info.temporal_patch_size) == (14, 2, 2)
    assert (info.num_lm_layers, info.num_vision_layers) == (2, 4)
    assert info.device == "cpu"
    assert info.dtype == "float32"
    assert info.arithmetic == "exact"  # transformers' own fp32 kernels: its bits
    assert "lm_layer_1" in info.outputs
    assert "vision_layer_3" in info.outputs
    assert info.chunk_bytes == 1 << 20
    assert info.min_pixels == 3136
    assert info.max_pixels == 12845056


def test_unloaded_model_is_unavailable() -> None:
    """Before the model is attached, calls get UNAVAILABLE (health says NOT_SERVING)."""
    import asyncio

    from qwen25vl_embed_server.rpc.server import create_server

    async def scenario() -> tuple[grpc.StatusCode, int]:
        running = await create_server(ServerConfig(port=0))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                try:
                    await pb_grpc.EmbeddingServiceStub(channel).Info(pb.InfoRequest())
                except grpc.aio.AioRpcError as err:
                    return err.code(), health.status
                raise AssertionError("Info succeeded without a model")
        finally:
            await running.stop(None)

    code, status = asyncio.run(scenario())
    assert code == grpc.StatusCode.UNAVAILABLE
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
