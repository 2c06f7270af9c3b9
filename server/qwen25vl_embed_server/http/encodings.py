"""The vectors' JSON forms: OpenAI's ``encoding_format`` and Cohere's ``embedding_types``.

Every vector here is L2-normalised (components in [-1, 1]). The compact forms reuse the gRPC
edge's vector encodings (:func:`~qwen25vl_embed_server.core.retrieval.heads.encode_vectors`):

- ``float``: the float32 values.
- ``base64``: the float32 values, little-endian, base64 (OpenAI's ``encoding_format``; decode with
  ``np.frombuffer(base64.b64decode(s), "<f4")``).
- ``int8``: ``round(v * 127)`` clipped to [-127, 127] (the gRPC VECTOR_ENCODING_INT8).
- ``uint8``: that int8 value + 128, in [1, 255].
- ``ubinary``: one bit per component, 1 where ``v > 0``, packed 8 per byte, first component in
  the most significant bit (numpy.packbits; the gRPC VECTOR_ENCODING_BINARY): ``ceil(E / 8)``
  values in [0, 255].
- ``binary``: those bytes - 128, as signed values in [-128, 127] (as Cohere and
  sentence-transformers pack signed binary).
"""

from __future__ import annotations

import base64

import numpy as np

from qwen25vl_embed_server.core.retrieval.heads import encode_vectors


def base64_floats(vector: np.ndarray) -> str:
    """float32 little-endian bytes, base64."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def encode(vector: np.ndarray, kind: str) -> list[float] | list[int] | str:
    """One vector ``[E]`` (float32, L2-normalised) in the form ``kind`` names (see the module)."""
    if kind == "float":
        return vector.astype(np.float32).tolist()  # type: ignore[no-any-return]
    if kind == "base64":
        return base64_floats(vector)
    if kind == "int8":
        return encode_vectors(vector, "int8").astype(np.int64).tolist()  # type: ignore[no-any-return]
    if kind == "uint8":
        return (encode_vectors(vector, "int8").astype(np.int64) + 128).tolist()  # type: ignore[no-any-return]
    if kind == "ubinary":
        return encode_vectors(vector, "binary").astype(np.int64).tolist()  # type: ignore[no-any-return]
    if kind == "binary":
        return (encode_vectors(vector, "binary").astype(np.int64) - 128).tolist()  # type: ignore[no-any-return]
    raise ValueError(f"unknown embedding type {kind!r}")
