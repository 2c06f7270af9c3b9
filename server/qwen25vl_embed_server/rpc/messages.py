"""Protobuf <-> the core's values: requests in, response messages and Info out."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from google.protobuf.message import DecodeError

from qwen25vl_embed import codec
from qwen25vl_embed.choices import PromptFormat, VectorEncoding
from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed_server.core.admission.request import EncodedRequest
from qwen25vl_embed_server.core.defaults import DEFAULT_WIRE_DTYPE
from qwen25vl_embed_server.core.errors import InvalidInputError, quoted
from qwen25vl_embed_server.core.model.finishing import Extraction
from qwen25vl_embed_server.core.model.model_info import ModelInfo, RecipeInfo
from qwen25vl_embed_server.core.model.output_settings import OutputSettings
from qwen25vl_embed_server.rpc.encoded_responses import serialized


@dataclass(frozen=True)
class Undecodable:
    """A request message that did not parse: what :func:`tolerant` yields in its place, so that the
    call (or, in a stream, that one request) is refused with INVALID_ARGUMENT instead of failing
    inside gRPC (UNKNOWN, or INTERNAL for the whole stream with results lost)."""

    size: int
    reason: str

    def error(self, what: str = "the request") -> InvalidInputError:
        return InvalidInputError(
            f"{what} is not a valid protobuf message of this method's request type "
            f"({self.size} bytes): {quoted(self.reason, 200)}"
        )


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer`` returning an :class:`Undecodable` instead of raising on malformed bytes
    (bad wire format, invalid UTF-8 in a string field); None (raw bytes) stays None."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, ValueError) as error:  # UnicodeDecodeError is a ValueError
            return Undecodable(len(data), str(error) or type(error).__name__)

    return parse


def to_encoded(request: pb.ImageRequest, request_id: str | None = None) -> EncodedRequest:
    """The core's request for ``request``; ``request_id`` overrides the message's own.

    Raises:
        InvalidInputError: a dtype that is not a floating-point wire dtype.
    """
    return EncodedRequest(
        images=[image.data for image in request.images],
        prompt=request.prompt if request.HasField("prompt") else None,
        outputs=tuple(request.outputs),
        settings=OutputSettings(
            dtype=wire_dtype(request.dtype),
            normalize=request.normalize,
            dimensions=request.dimensions,
            vector_encoding=_VECTOR_ENCODINGS.get(request.vector_encoding, str(request.vector_encoding)),
        ),
        request_id=request.request_id if request_id is None else request_id,
        prompt_format=prompt_format(request.prompt_format),
        min_pixels=request.min_pixels if request.HasField("min_pixels") else None,
        max_pixels=request.max_pixels if request.HasField("max_pixels") else None,
        adapter=request.adapter,
        task=request.task,
    )


# The proto's numbers -> the core's names, from the SDK's Enums (UNSPECIFIED: the default).
_VECTOR_ENCODINGS = {pb.VECTOR_ENCODING_UNSPECIFIED: VectorEncoding.FLOAT.value} | {
    member.proto: member.value for member in VectorEncoding
}


_PROMPT_FORMATS = {pb.PROMPT_FORMAT_UNSPECIFIED: PromptFormat.CHAT.value} | {
    member.proto: member.value for member in PromptFormat
}


def prompt_format(value: int) -> str:
    """The proto's PromptFormat -> the core's format name (UNSPECIFIED: chat)."""
    try:
        return _PROMPT_FORMATS[value]  # type: ignore[index]
    except KeyError:
        raise InvalidInputError(f"unknown prompt_format {value}") from None


def wire_dtype(dtype: int) -> str:
    """The proto's DType -> the core's dtype name (UNSPECIFIED: float32)."""
    if dtype == pb.DTYPE_UNSPECIFIED:
        return DEFAULT_WIRE_DTYPE
    if dtype in (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16):
        return codec.dtype_name(dtype)
    name = pb.DType.Name(dtype) if dtype in pb.DType.values() else str(dtype)  # type: ignore[arg-type]
    raise InvalidInputError(f"dtype {name} is not a floating-point wire dtype; use FLOAT32, FLOAT16 or BFLOAT16")


Response = pb.EmbeddingResponse | bytes
"""A response message, or its serialized bytes (:mod:`~.encoded_responses`)."""


def response_messages(
    request_id: str, result: Extraction, chunk_bytes: int, timings: pb.Timings | None = None, encoded: bool = False
) -> Iterator[Response]:
    """Metadata (with ``timings``, if given) first, then the tensors in messages of at most
    ``chunk_bytes``; the final one has ``last`` set.

    ``encoded``: the tensors' messages already serialized, with one copy of their bytes
    (:func:`~.encoded_responses.serialized`), for handlers whose serializer passes bytes through.
    """
    pending: pb.EmbeddingResponse | list[codec.Part] = pb.EmbeddingResponse(
        request_id=request_id,
        metadata=pb.ResponseMetadata(
            visual_token_lens=result.visual_token_lens.tolist(),
            image_grid_thw=[pb.ImageGrid(t=t, h=h, w=w) for t, h, w in result.image_grid_thw.tolist()],
            image_token_positions=result.image_token_positions.tolist(),
            sequence_length=result.sequence_length,
            timings=timings,
        ),
    )
    for parts in codec.split(result.tensors, chunk_bytes):
        yield _response(request_id, pending, last=False, encode=encoded)
        pending = parts
    yield _response(request_id, pending, last=True, encode=encoded)


def _response(request_id: str, pending: pb.EmbeddingResponse | list[codec.Part], last: bool, encode: bool) -> Response:
    if isinstance(pending, pb.EmbeddingResponse):  # the metadata: small, always a message
        pending.last = last
        return pending
    if encode:
        return serialized(request_id, pending, last)
    return pb.EmbeddingResponse(request_id=request_id, tensors=[part.message() for part in pending], last=last)


def error_message(request_id: str, code: int, details: str) -> pb.EmbeddingResponse:
    """The one message that ends a failed request of an ExtractBatch stream."""
    return pb.EmbeddingResponse(request_id=request_id, error=pb.RequestError(code=code, message=details), last=True)


def info_response(info: ModelInfo, chunk_bytes: int, server_version: str) -> pb.InfoResponse:
    """The InfoResponse: the model's facts (field for field), the chunk size and the version."""
    facts = asdict(info)
    del facts["load_seconds"]  # a metric, not a fact callers plan with
    del facts["recipe"]
    del facts["adapters"]
    response = pb.InfoResponse(**facts, chunk_bytes=chunk_bytes, server_version=server_version)
    if info.recipe is not None:  # its output name is derived (a property), not a field
        response.recipe.CopyFrom(recipe_message(info.recipe))
    for adapter in info.adapters:
        response.adapters.add(name=adapter.name, recipe=recipe_message(adapter.recipe))
    return response


def recipe_message(recipe: RecipeInfo) -> pb.Recipe:
    """A recipe's message: its fields, and its output names (properties, not fields)."""
    fields = {field.name for field in pb.Recipe.DESCRIPTOR.fields}
    values = {key: value for key, value in asdict(recipe).items() if key in fields}
    return pb.Recipe(**values, output=recipe.output, outputs=recipe.outputs)
