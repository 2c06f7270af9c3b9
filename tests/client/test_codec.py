"""The shared tensor codec: exact round trips, message budgets, zero-copy decoding, bad streams."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from qwen25vl_embed import codec
from qwen25vl_embed.codec import CodecError, TensorAssembler
from qwen25vl_embed.v1 import embed_pb2 as pb

RNG = np.random.default_rng(0)
WIRE_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
}


def _random(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "i":
        return RNG.integers(-(2**62), 2**62, size=shape, dtype=np.int64)
    return RNG.standard_normal(shape).astype(np.float32).astype(dtype)


def _assert_identical(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same dtype, shape and bytes (exact, and meaningful for bfloat16 too)."""
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert np.ascontiguousarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes()


def _root_base(array: np.ndarray) -> object:
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    return base


@pytest.mark.parametrize("dtype_name", list(WIRE_DTYPES))
@pytest.mark.parametrize("shape", [(3, 4), (), (0, 5), (2, 0, 3), (1, 7, 2)])
def test_encode_decode_round_trip_is_exact(dtype_name: str, shape: tuple[int, ...]) -> None:
    array = _random(shape, WIRE_DTYPES[dtype_name])
    tensor = codec.encode("t", array)
    assert tensor.dtype == codec.dtype_from_name(dtype_name)
    assert list(tensor.shape) == list(shape)
    assert tensor.offset == 0
    _assert_identical(codec.decode(tensor), array)


def test_bfloat16_wire_bytes_are_the_upper_half_of_float32() -> None:
    values = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    tensor = codec.encode("b", values.astype(ml_dtypes.bfloat16))
    widened = (np.frombuffer(tensor.data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(widened, values)


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a[:, ::2],  # strided
        lambda a: a.T,  # Fortran order
        lambda a: np.asfortranarray(a),
        lambda a: a[::-1],  # negative stride
    ],
)
def test_non_contiguous_input_is_sent_in_row_major_order(make: object) -> None:
    base = np.arange(48, dtype=np.float32).reshape(6, 8)
    array = make(base)  # type: ignore[operator]
    decoded = codec.decode(codec.encode("t", array))
    _assert_identical(decoded, np.ascontiguousarray(array))
    np.testing.assert_array_equal(decoded, array)


def test_decode_is_a_read_only_zero_copy_view_of_the_message_bytes() -> None:
    tensor = codec.encode("t", np.arange(12, dtype=np.float32).reshape(3, 4))
    decoded = codec.decode(tensor)
    assert not decoded.flags.writeable
    assert not decoded.flags.owndata
    root = _root_base(decoded)
    assert isinstance(root, bytes)
    assert root == tensor.data


def test_dtype_helpers() -> None:
    for name, np_dtype in WIRE_DTYPES.items():
        wire = codec.dtype_from_name(name)
        assert codec.dtype_name(wire) == name
        assert codec.numpy_dtype(wire) == np_dtype
        assert codec.wire_dtype_of(np.zeros(1, np_dtype)) == wire
    with pytest.raises(ValueError, match="float64"):
        codec.dtype_from_name("float64")
    with pytest.raises(CodecError):
        codec.wire_dtype_of(np.zeros(1, np.float64))
    with pytest.raises(CodecError):
        codec.numpy_dtype(pb.DTYPE_UNSPECIFIED)


def test_decode_rejects_wrong_byte_count_and_negative_shape() -> None:
    with pytest.raises(CodecError, match="expected 48"):
        codec.decode(pb.Tensor(name="t", shape=[3, 4], dtype=pb.DTYPE_FLOAT32, data=b"\0" * 40))
    with pytest.raises(CodecError, match="negative"):
        codec.decode(pb.Tensor(name="t", shape=[-1, -1], dtype=pb.DTYPE_FLOAT32, data=b"\0" * 4))


# --- pack / TensorAssembler -------------------------------------------------------------------


def _mixed_tensors() -> dict[str, np.ndarray]:
    return {
        "visual_token_lens": np.array([6, 2], dtype=np.int64),
        "vision_pooled_mean": _random((1, 40), np.dtype(np.float32)),
        "projected_tokens": _random((300, 7), np.dtype(np.float32)),  # 8400 B: split
        "lm_last_token": _random((1, 64), np.dtype(ml_dtypes.bfloat16)),
        "vision_tokens": _random((513, 5), np.dtype(ml_dtypes.bfloat16)),  # odd byte count
        "empty": np.zeros((0, 4), np.float16),
        "scalar": np.array(3.5, np.float32),
        "lm_layer_-1": _random((1, 2, 3, 200), np.dtype(np.float16)),
        "image_grid_thw": np.array([[1, 4, 6], [1, 2, 4]], dtype=np.int64),
    }


def _parts_by_name(batches: list[list[pb.Tensor]]) -> dict[str, list[pb.Tensor]]:
    parts: dict[str, list[pb.Tensor]] = {}
    for batch in batches:
        for tensor in batch:
            parts.setdefault(tensor.name, []).append(tensor)
    return parts


@pytest.mark.parametrize("message_bytes", [2049, 4096, 6000])
def test_pack_respects_the_budget_and_reassembles_exactly(message_bytes: int) -> None:
    tensors = _mixed_tensors()
    assert max(a.nbytes for a in tensors.values()) > message_bytes  # something must be split
    batches = list(codec.pack(tensors, message_bytes))

    for batch in batches:
        assert batch, "pack yielded an empty message"
        response = pb.EmbeddingResponse(request_id="x" * 64, tensors=batch)
        assert response.ByteSize() <= message_bytes

    assembler = TensorAssembler()
    for batch in batches:
        # Through the wire format, as a client would see it.
        received = pb.EmbeddingResponse.FromString(pb.EmbeddingResponse(tensors=batch).SerializeToString())
        for tensor in received.tensors:
            assembler.add(tensor)
    rebuilt = assembler.finish()
    assert list(rebuilt) == list(tensors)  # arrival order is insertion order
    for name, array in tensors.items():
        _assert_identical(rebuilt[name], array)
        assert not rebuilt[name].flags.writeable

    parts = _parts_by_name(batches)
    for name, array in tensors.items():
        if array.nbytes > message_bytes:
            assert len(parts[name]) > 1
        offsets = [p.offset for p in parts[name]]
        sizes = [len(p.data) for p in parts[name]]
        assert offsets == [sum(sizes[:i]) for i in range(len(sizes))]
        assert all(list(p.shape) == list(array.shape) for p in parts[name])
        if array.nbytes + 200 <= message_bytes - 1024:
            assert len(parts[name]) == 1, f"{name} ({array.nbytes} B) fits whole but was split"


def test_pack_puts_small_tensors_together() -> None:
    tensors = {f"pooled_{i}": np.full((1, 16), i, np.float32) for i in range(10)}
    batches = list(codec.pack(tensors, 4096))
    assert len(batches) == 1
    assert [t.name for t in batches[0]] == list(tensors)


def test_pack_with_large_messages_and_long_names() -> None:
    name = "vision_layer_-" + "9" * 60
    tensors = {name: _random((1500, 513), np.dtype(np.float32)), "tiny": np.ones(3, np.int64)}
    message_bytes = 1 << 20
    batches = list(codec.pack(tensors, message_bytes))
    assert len(batches) == 3  # 3.08 MB in 1 MiB messages
    assembler = TensorAssembler()
    for batch in batches:
        assert pb.EmbeddingResponse(request_id="x" * 64, tensors=batch).ByteSize() <= message_bytes
        for tensor in batch:
            assembler.add(tensor)
    rebuilt = assembler.finish()
    for key, array in tensors.items():
        _assert_identical(rebuilt[key], array)


def test_pack_rejects_a_budget_too_small() -> None:
    with pytest.raises(CodecError, match="too small"):
        list(codec.pack({"a": np.zeros(1, np.float32)}, 2048))


def _split_parts() -> list[pb.Tensor]:
    """Three parts of one float32 [3000] tensor."""
    batches = list(codec.pack({"big": np.arange(3000, dtype=np.float32)}, 6000))
    parts = [tensor for batch in batches for tensor in batch]
    assert len(parts) == 3
    return parts


def test_assembler_rejects_a_first_part_not_at_zero() -> None:
    parts = _split_parts()
    with pytest.raises(CodecError, match="not 0"):
        TensorAssembler().add(parts[1])


def test_assembler_rejects_a_skipped_or_repeated_part() -> None:
    parts = _split_parts()
    assembler = TensorAssembler()
    assembler.add(parts[0])
    with pytest.raises(CodecError, match="expected"):
        assembler.add(parts[2])
    with pytest.raises(CodecError, match="expected"):
        assembler.add(parts[0])


def test_assembler_rejects_a_duplicate_tensor() -> None:
    tensor = codec.encode("t", np.ones(4, np.float32))
    assembler = TensorAssembler()
    assembler.add(tensor)
    with pytest.raises(CodecError, match="twice"):
        assembler.add(tensor)


def test_assembler_rejects_an_incomplete_stream() -> None:
    parts = _split_parts()
    assembler = TensorAssembler()
    assembler.add(codec.encode("whole", np.ones(2, np.float32)))
    assembler.add(parts[0])
    assembler.add(parts[1])
    with pytest.raises(CodecError, match="big"):
        assembler.finish()


def test_assembler_rejects_parts_that_disagree_on_shape_or_dtype() -> None:
    parts = _split_parts()
    changed_shape = pb.Tensor()
    changed_shape.CopyFrom(parts[1])
    changed_shape.shape[:] = [1000, 3]
    assembler = TensorAssembler()
    assembler.add(parts[0])
    with pytest.raises(CodecError, match="first part"):
        assembler.add(changed_shape)

    changed_dtype = pb.Tensor()
    changed_dtype.CopyFrom(parts[1])
    changed_dtype.dtype = pb.DTYPE_INT64
    assembler = TensorAssembler()
    assembler.add(parts[0])
    with pytest.raises(CodecError, match="first part"):
        assembler.add(changed_dtype)


def test_assembler_rejects_too_many_bytes() -> None:
    tensor = pb.Tensor(name="t", shape=[2], dtype=pb.DTYPE_FLOAT32, data=b"\0" * 12)
    with pytest.raises(CodecError, match="expected 8"):
        TensorAssembler().add(tensor)
