"""Stream assembly: the responses of one Extract stream, in order, become one :class:`Embeddings`.

:class:`ResultBuilder` is shared by the sync and asyncio clients and by ``extract_many``, which
keeps one per request of an ExtractBatch stream; :func:`from_response_stream` drives it over a
whole stream.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from qwen25vl_embed import codec
from qwen25vl_embed.embeddings import Embeddings, Timings
from qwen25vl_embed.v1 import embed_pb2 as pb

__all__ = ["ResultBuilder", "from_response_stream"]


def from_response_stream(responses: Iterable[pb.EmbeddingResponse]) -> Embeddings:
    """The result carried by the responses of one Extract stream, in stream order.

    Raises:
        qwen25vl_embed.codec.CodecError: the stream is empty, lacks metadata on its first
            response, or holds an incomplete or inconsistent tensor.
    """
    builder = ResultBuilder()
    for response in responses:
        builder.add(response)
    return builder.build()


class ResultBuilder:
    """Accumulates the responses of one Extract stream, in order, into an :class:`Embeddings`.

    Shared by the sync and asyncio clients: call :meth:`add` for each response, then :meth:`build`.
    """

    def __init__(self) -> None:
        self._assembler = codec.TensorAssembler()
        self._metadata: pb.ResponseMetadata | None = None
        self._request_id = ""

    def add(self, response: pb.EmbeddingResponse) -> None:
        """Take the next response of the stream.

        Raises:
            qwen25vl_embed.codec.CodecError: metadata missing from the first response or present on
                a later one, or a tensor part out of order.
        """
        has_metadata = response.HasField("metadata")
        if self._metadata is None:
            if not has_metadata:
                raise codec.CodecError("the first response of the stream carries no metadata")
            self._metadata = response.metadata
            self._request_id = response.request_id
        elif has_metadata:
            raise codec.CodecError("metadata received again after the first response")
        for tensor in response.tensors:
            self._assembler.add(tensor)

    def build(self) -> Embeddings:
        """The result, once the stream has ended.

        Raises:
            qwen25vl_embed.codec.CodecError: no response arrived, or a tensor is incomplete.
        """
        if self._metadata is None:
            raise codec.CodecError("the stream ended before its first response")
        meta = self._metadata
        grid = [(g.t, g.h, g.w) for g in meta.image_grid_thw]
        return Embeddings(
            tensors=self._assembler.finish(),
            visual_token_lens=np.array(meta.visual_token_lens, dtype=np.int64),
            image_grid_thw=np.array(grid, dtype=np.int64).reshape(-1, 3),
            image_token_positions=np.array(meta.image_token_positions, dtype=np.int64),
            sequence_length=meta.sequence_length,
            request_id=self._request_id,
            timings=Timings.from_proto(meta.timings) if meta.HasField("timings") else None,
        )
