"""The protocol's sharp edges: malformed messages, request ids in a stream, client strings in
messages and log lines. Raw channels send bytes that the SDK would never build."""

from __future__ import annotations

import logging
import time

import grpc
import pytest

from qwen25vl_embed import EmbeddingClient, EmbeddingError
from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed_server.core.errors import quoted
from qwen25vl_embed_server.rpc.calls import StreamIds
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import noise_image, png_bytes

SERVICE = "/qwen25vl_embed.v1.EmbeddingService/"
REQUEST_LOG = "qwen25vl_embed_server.requests"
# A field 1 (images) declared 1,000 bytes long with 3 bytes of data: not a valid message.
MALFORMED = b"\x0a\xe8\x07abc"
# A valid wire format whose string field (request_id, 5) is not UTF-8: protobuf refuses it too.
BAD_UTF8 = b"\x2a\x02\xff\xfe"
CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def good_request(request_id: str) -> pb.ImageRequest:
    image = pb.Image(data=png_bytes(noise_image(28, 28)))
    return pb.ImageRequest(images=[image], outputs=["lm_last_token"], request_id=request_id)


def batch(server: BackgroundServer, messages: list[bytes]) -> list[pb.EmbeddingResponse]:
    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_stream(
            SERVICE + "ExtractBatch", request_serializer=None, response_deserializer=pb.EmbeddingResponse.FromString
        )
        return list(call(iter(messages), timeout=60))


def outcomes(responses: list[pb.EmbeddingResponse]) -> dict[str, list[str]]:
    """Per request id, what its responses were (sorted: results come as they finish): "result" per
    complete result, the error's code name per error."""
    seen: dict[str, list[str]] = {}
    for response in responses:
        if response.HasField("error"):
            seen.setdefault(response.request_id, []).append(CODE_NAMES[response.error.code])
        elif response.last:
            seen.setdefault(response.request_id, []).append("result")
    return {request_id: sorted(kinds) for request_id, kinds in seen.items()}


@pytest.mark.parametrize("data", [MALFORMED, BAD_UTF8])
def test_a_malformed_extract_is_invalid_argument(server: BackgroundServer, data: bytes) -> None:
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_stream(
            SERVICE + "Extract", request_serializer=None, response_deserializer=pb.EmbeddingResponse.FromString
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(call(data, timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in (caught.value.details() or "")


def test_a_malformed_info_is_invalid_argument(server: BackgroundServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(SERVICE + "Info", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as caught:
            call(MALFORMED, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_malformed_message_in_a_stream_fails_that_request_only(server: BackgroundServer) -> None:
    messages = [
        good_request("before").SerializeToString(),
        MALFORMED,
        BAD_UTF8,
        good_request("after").SerializeToString(),
    ]
    assert outcomes(batch(server, messages)) == {
        "before": ["result"],
        "1": ["INVALID_ARGUMENT"],
        "2": ["INVALID_ARGUMENT"],
        "after": ["result"],
    }


def test_a_duplicate_request_id_is_refused_and_the_first_answered_once(server: BackgroundServer) -> None:
    responses = batch(server, [good_request(i).SerializeToString() for i in ("a", "b", "a")])
    assert outcomes(responses) == {"a": ["INVALID_ARGUMENT", "result"], "b": ["result"]}
    (refusal,) = [r for r in responses if r.HasField("error")]
    assert "request_id 'a' is already used by request 0 of this stream" in refusal.error.message


def test_substituted_ids_never_collide_with_explicit_ones(server: BackgroundServer) -> None:
    # Index 1 is empty while "1" is taken; index 3's explicit "2" was given to index 2 already.
    ids = ["1", "", "", "2"]
    assert outcomes(batch(server, [good_request(i).SerializeToString() for i in ids])) == {
        "1": ["result"],
        "1.1": ["result"],
        "2": ["INVALID_ARGUMENT", "result"],
    }


def test_stream_ids_unit() -> None:
    ids = StreamIds()
    assert ids.assign("", 0) == ("0", None)
    assert ids.assign("0.1", 1) == ("0.1", None)
    assert ids.assign("", 2) == ("2", None)
    assert ids.assign("3", 3) == ("3", None)
    assert ids.assign("", 4) == ("4", None)
    assert ids.assign("x" * 300, 5) == ("x" * 300, None)  # refused later for its length, not remembered
    assert ids.assign("x" * 300, 6)[1] is None
    request_id, refusal = ids.assign("0", 7)
    assert request_id == "0"
    assert refusal is not None
    assert "request 0" in refusal


def test_client_strings_are_bounded_and_escaped(client: EmbeddingClient, caplog: pytest.LogCaptureFixture) -> None:
    hostile = "evil\nstatus=OK " + "x" * 100_000
    with caplog.at_level(logging.INFO, logger=REQUEST_LOG), pytest.raises(EmbeddingError) as caught:
        client.extract(png_bytes(noise_image(28, 28)), outputs=[hostile], request_id="id\r\nforged line")
    message = str(caught.value)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert quoted(hostile) in message
    assert "\n" not in message
    assert len(message) < 1000
    deadline = time.monotonic() + 10
    while not [r for r in caplog.records if r.name == REQUEST_LOG] and time.monotonic() < deadline:
        time.sleep(0.01)
    (record,) = [r for r in caplog.records if r.name == REQUEST_LOG]
    line = record.getMessage()
    assert "\n" not in line
    assert "\r" not in line
    assert len(line) < 1000
    assert "id='id\\r\\nforged line'" in line


def test_a_layer_number_too_long_for_int_is_invalid_argument(client: EmbeddingClient) -> None:
    with pytest.raises(EmbeddingError) as caught:
        client.extract(png_bytes(noise_image(28, 28)), outputs=["lm_layer_" + "9" * 5000])
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown output 'lm_layer_999" in str(caught.value)
