"""numpy array <-> ``Tensor`` message, the one codec that the client and the server share.

A tensor travels as (name, shape, dtype, raw little-endian row-major bytes). Tensors larger than
a message budget are split into consecutive parts; :class:`TensorAssembler` rebuilds them.
Decoding a tensor that arrived in one part is zero-copy (a read-only view of the message bytes).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import numpy.typing as npt

from qwen25vl_embed.v1 import embed_pb2 as pb

# Wire dtype names accepted by the SDK, and their numpy types (all little-endian).
_NUMPY_BY_DTYPE: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT8: np.dtype("i1"),
    pb.DTYPE_UINT8: np.dtype("u1"),
}
_DTYPE_BY_NAME: dict[str, int] = {
    "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
    "int64": pb.DTYPE_INT64,
    "int8": pb.DTYPE_INT8,
    "uint8": pb.DTYPE_UINT8,
}
FLOAT_DTYPE_NAMES = ("float32", "float16", "bfloat16")

# Room left in each message for everything but tensor bytes (names, shapes, field tags).
_MESSAGE_OVERHEAD = 1024


class CodecError(ValueError):
    """A tensor could not be encoded or rebuilt (unknown dtype, inconsistent parts)."""


def dtype_from_name(name: str) -> pb.DType.ValueType:
    """The wire dtype for a name: "float32", "float16", "bfloat16", "int64", "int8" or "uint8"."""
    try:
        return _DTYPE_BY_NAME[name]  # type: ignore[return-value]
    except KeyError:
        raise CodecError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPE_BY_NAME)}") from None


def dtype_name(dtype: int) -> str:
    """The name of a wire dtype (inverse of :func:`dtype_from_name`)."""
    for name, value in _DTYPE_BY_NAME.items():
        if value == dtype:
            return name
    raise CodecError(f"unknown wire dtype {dtype}")


def numpy_dtype(dtype: int) -> np.dtype:
    """The numpy dtype of a wire dtype; bfloat16 is ``ml_dtypes.bfloat16``."""
    try:
        return _NUMPY_BY_DTYPE[dtype]
    except KeyError:
        raise CodecError(f"unknown wire dtype {dtype}") from None


def wire_dtype_of(array: np.ndarray) -> pb.DType.ValueType:
    """The wire dtype that carries ``array`` unchanged."""
    for dtype, np_dtype in _NUMPY_BY_DTYPE.items():
        if array.dtype == np_dtype:
            return dtype  # type: ignore[return-value]
    raise CodecError(f"no wire dtype for numpy dtype {array.dtype}")


def encode(name: str, array: np.ndarray) -> pb.Tensor:
    """Encode ``array`` whole as one ``Tensor`` message (one copy of its bytes)."""
    return pb.Tensor(name=name, shape=list(array.shape), dtype=wire_dtype_of(array), data=_raw(array).tobytes())


@dataclass(frozen=True)
class Part:
    """One ``Tensor`` message's worth of a tensor, its bytes not yet copied out of the array."""

    name: str
    shape: list[int]
    dtype: pb.DType.ValueType
    data: memoryview
    offset: int

    def message(self) -> pb.Tensor:
        """This part as a ``Tensor`` message (one copy of its bytes)."""
        return pb.Tensor(
            name=self.name, shape=self.shape, dtype=self.dtype, data=self.data.tobytes(), offset=self.offset
        )


def split(tensors: Mapping[str, np.ndarray], message_bytes: int) -> Iterator[list[Part]]:
    """Group ``tensors`` into lists of :class:`Part` that each fit one message of ``message_bytes``.

    Small tensors share a message; a tensor that does not fit whole is split into consecutive parts
    across messages, in byte order. Every part carries the full shape and dtype. Nothing is copied:
    each part views its array's bytes.
    """
    budget = message_bytes - _MESSAGE_OVERHEAD
    if budget <= _MESSAGE_OVERHEAD:
        raise CodecError(f"message size {message_bytes} is too small (minimum {2 * _MESSAGE_OVERHEAD + 1})")
    batch: list[Part] = []
    room = budget
    for name, array in tensors.items():
        raw, shape, dtype = _raw(array), list(array.shape), wire_dtype_of(array)
        # Field tags, varints and length prefixes around the data: bounded, small.
        framing = len(name.encode()) + 11 * len(shape) + 48
        whole = raw.nbytes + framing
        if batch and (room <= framing or (whole > room and whole <= budget)):
            # Start a fresh message rather than split a tensor that fits whole in one.
            yield batch
            batch, room = [], budget
        offset = 0
        while True:
            take = min(raw.nbytes - offset, room - framing)
            batch.append(Part(name, shape, dtype, raw[offset : offset + take], offset))
            room -= take + framing
            offset += take
            if offset >= raw.nbytes:
                break
            yield batch
            batch, room = [], budget
    if batch:
        yield batch


def pack(tensors: Mapping[str, np.ndarray], message_bytes: int) -> Iterator[list[pb.Tensor]]:
    """:func:`split`, each part made a ``Tensor`` message."""
    for batch in split(tensors, message_bytes):
        yield [part.message() for part in batch]


def _raw(array: np.ndarray) -> memoryview:
    """The row-major little-endian bytes of ``array``, without a copy where already contiguous."""
    wire_dtype_of(array)  # rejects dtypes the wire cannot carry
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).data


def decode(tensor: pb.Tensor) -> np.ndarray:
    """A complete one-part ``Tensor`` as a read-only numpy array viewing the message's bytes."""
    return _view(tensor.data, tensor.shape, tensor.dtype, tensor.name)


def _view(data: bytes, shape: Iterable[int], dtype: int, name: str) -> np.ndarray:
    np_dtype = numpy_dtype(dtype)
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise CodecError(f"tensor {name!r}: negative dimension in shape {list(dims)}")
    expected = int(np.prod(dims, dtype=np.int64)) * np_dtype.itemsize
    if len(data) != expected:
        raise CodecError(
            f"tensor {name!r}: {len(data)} bytes for shape {list(dims)} of {dtype_name(dtype)} (expected {expected})"
        )
    return np.frombuffer(data, dtype=np_dtype).reshape(dims)


@dataclass
class _Pending:
    shape: list[int]
    dtype: int
    parts: list[bytes] = field(default_factory=list)
    received: int = 0


class TensorAssembler:
    """Rebuilds tensors from parts that arrive in order, possibly across several messages.

    Feed every ``Tensor`` message with :meth:`add`; :meth:`finish` returns name -> array. Arrays
    that arrived in one part are zero-copy, read-only views of the message bytes.
    """

    def __init__(self) -> None:
        self._pending: dict[str, _Pending] = {}
        self._done: dict[str, npt.NDArray[np.generic]] = {}

    def add(self, tensor: pb.Tensor) -> None:
        name = tensor.name
        if name in self._done:
            raise CodecError(f"tensor {name!r} received twice")
        pending = self._pending.get(name)
        if pending is None:
            if tensor.offset != 0:
                raise CodecError(f"tensor {name!r}: first part starts at byte {tensor.offset}, not 0")
            pending = _Pending(shape=list(tensor.shape), dtype=tensor.dtype)
            self._pending[name] = pending
        elif tensor.offset != pending.received:
            raise CodecError(f"tensor {name!r}: part at byte {tensor.offset}, expected {pending.received}")
        elif list(tensor.shape) != pending.shape or tensor.dtype != pending.dtype:
            raise CodecError(
                f"tensor {name!r}: part with shape {list(tensor.shape)} and dtype {tensor.dtype}, "
                f"but its first part had shape {pending.shape} and dtype {pending.dtype}"
            )
        data = tensor.data  # each read of a bytes field copies it out of the message
        pending.parts.append(data)
        pending.received += len(data)
        expected = int(np.prod(pending.shape, dtype=np.int64)) * numpy_dtype(pending.dtype).itemsize
        if pending.received >= expected:
            data = pending.parts[0] if len(pending.parts) == 1 else b"".join(pending.parts)
            self._done[name] = _view(data, pending.shape, pending.dtype, name)
            del self._pending[name]

    def finish(self) -> dict[str, np.ndarray]:
        """All rebuilt tensors, in arrival order. Raises if a tensor is still incomplete."""
        if self._pending:
            missing = ", ".join(sorted(self._pending))
            raise CodecError(f"stream ended before these tensors were complete: {missing}")
        return dict(self._done)
