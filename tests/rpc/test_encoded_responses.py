"""The server's one-copy responses are the very bytes protobuf would write, and pass gRPC unchanged."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from qwen25vl_embed import codec
from qwen25vl_embed.assembly import from_response_stream
from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed_server.core.model.finishing import Extraction
from qwen25vl_embed_server.rpc.encoded_responses import passing_encoded, serialized
from qwen25vl_embed_server.rpc.messages import response_messages


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "vision_tokens": rng.standard_normal((700, 33), dtype=np.float32),  # split across messages
        "projected_tokens": rng.standard_normal((40, 300)).astype(ml_dtypes.bfloat16).T,  # not contiguous
        "lm_last_hidden": rng.standard_normal((1, 129, 5)).astype(np.float16),  # odd byte count
        "empty": np.zeros((0, 4), np.float32),  # no data field at all in proto3
        "scalar": np.array(2.5, np.float32),
        "vision_pooled_mean": rng.standard_normal((1, 33), dtype=np.float32),
        "visual_token_lens": np.array([300, 2**40], np.int64),  # multi-byte varints in the shape too
    }


def _extraction() -> Extraction:
    return Extraction(
        tensors=_tensors(),
        visual_token_lens=np.array([6, 2], np.int64),
        image_grid_thw=np.array([[1, 4, 6], [1, 2, 4]], np.int64),
        image_token_positions=np.arange(3, 11, dtype=np.int64),
        sequence_length=20,
    )


def _serialized(message: pb.EmbeddingResponse | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


@pytest.mark.parametrize("request_id", ["", "req-9", "r" * 300])
@pytest.mark.parametrize("last", [False, True])
@pytest.mark.parametrize("message_bytes", [2049, 6000, 1 << 20])
def test_serialized_equals_protobufs_own_serialization(request_id: str, last: bool, message_bytes: int) -> None:
    batches = list(codec.split(_tensors(), message_bytes))
    assert len(batches) > 1 or message_bytes == 1 << 20
    for parts in batches:
        message = pb.EmbeddingResponse(request_id=request_id, tensors=[part.message() for part in parts], last=last)
        assert serialized(request_id, parts, last) == message.SerializeToString()


@pytest.mark.parametrize("chunk_bytes", [4096, 1 << 20])
def test_encoded_responses_equal_the_messages_and_rebuild_the_tensors(chunk_bytes: int) -> None:
    timings = pb.Timings(queue_ms=1.5, model_ms=20.0, total_ms=30.0, batch_size=2)
    plain = list(response_messages("id-1", _extraction(), chunk_bytes, timings))
    fast = list(response_messages("id-1", _extraction(), chunk_bytes, timings, encoded=True))
    assert all(isinstance(message, pb.EmbeddingResponse) for message in plain)
    assert isinstance(fast[0], pb.EmbeddingResponse)  # the metadata stays a message
    assert all(isinstance(message, bytes) for message in fast[1:])
    assert [_serialized(m) for m in fast] == [_serialized(m) for m in plain]

    received = [pb.EmbeddingResponse.FromString(_serialized(message)) for message in fast]
    assert [r.last for r in received] == [False] * (len(received) - 1) + [True]
    assert all(r.ByteSize() <= chunk_bytes for r in received)
    result = from_response_stream(received)
    assert result.request_id == "id-1"
    assert result.timings is not None
    assert result.timings.model_ms == 20.0
    for name, array in _tensors().items():
        assert result[name].dtype == array.dtype
        assert result[name].shape == array.shape
        assert result[name].tobytes() == array.tobytes()


def test_a_result_without_tensors_is_one_message() -> None:
    result = Extraction({}, np.zeros(0, np.int64), np.zeros((0, 3), np.int64), np.zeros(0, np.int64), 4)
    (only,) = response_messages("t", result, 1 << 20, encoded=True)
    assert isinstance(only, pb.EmbeddingResponse)
    assert only.last
    assert only.HasField("metadata")


def test_the_serializer_passes_bytes_and_serializes_messages() -> None:
    serialize = passing_encoded(pb.EmbeddingResponse.SerializeToString)
    message = pb.EmbeddingResponse(request_id="x", last=True)
    assert serialize(message) == message.SerializeToString()
    assert serialize(b"\x0a\x01x") == b"\x0a\x01x"
