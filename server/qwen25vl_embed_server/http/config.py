"""The HTTP edge's settings (where it listens, which vector a raw checkpoint answers with)."""

from __future__ import annotations

from dataclasses import dataclass

from qwen25vl_embed_server.core.model.outputs import LM_LAST_TOKEN, POOLED

DEFAULT_HTTP_VECTOR = LM_LAST_TOKEN
"""The vector a checkpoint without a retrieval recipe answers with: the last token's final hidden
state, L2-normalised (as GME, DSE and VLM2Vec pool, and as vLLM's ``--convert embed`` does)."""

HTTP_VECTORS = POOLED
"""The pooled capture points that ``--http-vector`` may name."""

DEFAULT_MAX_INPUTS = 256
"""Inputs (texts or images) one HTTP request may carry; each is one request of the pipeline."""


@dataclass(frozen=True)
class HTTPConfig:
    """``port``: where the HTTP API listens, on the gRPC server's host (0: any free port).
    ``vector``: the pooled output a raw checkpoint answers with (a retrieval checkpoint answers
    with its recipe's vector). ``served_model_name``: the name clients give as ``model`` and
    ``GET /v1/models`` lists (None: the model as the server was given it). ``max_inputs``: inputs
    per HTTP request, beyond which it is refused with 413."""

    port: int = 0
    vector: str = DEFAULT_HTTP_VECTOR
    served_model_name: str | None = None
    max_inputs: int = DEFAULT_MAX_INPUTS

    def __post_init__(self) -> None:
        if self.vector not in HTTP_VECTORS:
            raise ValueError(f"unknown HTTP vector {self.vector!r}; expected one of {', '.join(HTTP_VECTORS)}")
        if self.max_inputs < 1:
            raise ValueError(f"max_inputs must be at least 1, got {self.max_inputs}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"the HTTP port must be between 0 and 65535, got {self.port}")


class HTTPListenError(OSError):
    """The HTTP API cannot listen where it was told to (defined here, away from uvicorn, so that the
    command line can name it without the server extra installed)."""
