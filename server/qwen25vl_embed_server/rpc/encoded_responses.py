"""Tensor responses serialized with one copy of their bytes: the gRPC server's fast path.

Building a response the usual way copies each tensor's bytes four times before gRPC sees them: out
of the array (``tobytes``), into the ``Tensor`` message, into the ``EmbeddingResponse`` and into the
serialized string. Each copy lands in freshly allocated memory, so it runs at the speed of page
faults rather than of memory (about 1 GB/s here, against 3-6 GB/s for an array copy).
:func:`serialized` writes the same wire bytes directly: the small fields (name, shape, dtype, offset,
request_id, last) are serialized by protobuf, and each part's data, which protobuf would copy
unchanged anyway, is placed beside them by one join straight from the array. The bytes equal
``SerializeToString()`` of the message built the usual way (tested), so what a client receives,
in any language, does not change.

The handlers that send such bytes need a response serializer that passes them through:
:class:`PassEncodedResponses` (``rpc/server.py`` installs it). A Ray Serve replica yields messages
instead: Serve's proxy serializes what replicas return itself. ``python -m bench.service.transfer``
measures both paths in one run.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import grpc

from qwen25vl_embed.codec import Part
from qwen25vl_embed.v1 import embed_pb2 as pb

_LENGTH_DELIMITED = 2  # the wire type of bytes, strings and embedded messages
_TENSORS_KEY = pb.EmbeddingResponse.DESCRIPTOR.fields_by_name["tensors"].number << 3 | _LENGTH_DELIMITED
_DATA_KEY = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number << 3 | _LENGTH_DELIMITED
_LAST = pb.EmbeddingResponse(last=True).SerializeToString()


def serialized(request_id: str, parts: Sequence[Part], last: bool) -> bytes:
    """``EmbeddingResponse(request_id=..., tensors=[part.message() ...], last=...).SerializeToString()``,
    with each part's data copied once (from its array into the result)."""
    pieces: list[bytes | memoryview] = [pb.EmbeddingResponse(request_id=request_id).SerializeToString()]
    for part in parts:
        # Fields in number order, as protobuf writes them: name, shape, dtype | data | offset.
        head = pb.Tensor(name=part.name, shape=part.shape, dtype=part.dtype).SerializeToString()
        data_key = _key_and_length(_DATA_KEY, part.data.nbytes) if part.data.nbytes else b""  # proto3: empty is absent
        tail = pb.Tensor(offset=part.offset).SerializeToString()
        size = len(head) + len(data_key) + part.data.nbytes + len(tail)
        pieces += [_key_and_length(_TENSORS_KEY, size), head, data_key, part.data, tail]
    if last:
        pieces.append(_LAST)
    return b"".join(pieces)


def _key_and_length(key: int, length: int) -> bytes:
    return _varint(key) + _varint(length)


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative int: 7 bits a byte, low bits first."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def passing_encoded(serializer: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """``serializer``, except that bytes (a message :func:`serialized` already wrote) pass as they are."""

    def serialize(message: Any) -> bytes:
        return message if isinstance(message, bytes) else serializer(message)

    return serialize


class PassEncodedResponses(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Gives every handler a response serializer that lets already-serialized responses through."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler.response_serializer is None:
            return handler
        # grpc's handlers are named tuples: the same handler with one field replaced.
        replaced = handler._replace(response_serializer=passing_encoded(handler.response_serializer))  # type: ignore[attr-defined]
        return cast("grpc.RpcMethodHandler[Any, Any]", replaced)
