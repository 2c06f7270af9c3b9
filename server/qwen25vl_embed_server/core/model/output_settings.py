"""How one request's outputs are finished: one typed value that every entry point builds.

The prompt and its format shape the model's inputs and travel beside this value; everything here
acts only after the forward (pooling's normalisation, the retrieval vectors' size and encoding,
the wire dtype). No torch here: admission checks requests before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen25vl_embed_server.core.defaults import DEFAULT_WIRE_DTYPE
from qwen25vl_embed_server.core.errors import InvalidInputError

WIRE_DTYPES = ("float32", "float16", "bfloat16")
"""Floating outputs' dtypes on the wire (as the CLI, the proto's DType and numpy/ml_dtypes spell them)."""

VECTOR_ENCODINGS = ("float", "int8", "binary")
"""The retrieval vectors' wire forms (:func:`~qwen25vl_embed_server.core.retrieval.heads.encode_vectors`)."""


@dataclass(frozen=True, kw_only=True)
class OutputSettings:
    """One request's output settings.

    Attributes:
        dtype: the floating outputs' wire dtype, one of :data:`WIRE_DTYPES`.
        normalize: L2-normalise the pooled vectors.
        dimensions: keep the first this many components of the retrieval vectors, renormalised
            (Matryoshka); 0: all.
        vector_encoding: the retrieval vectors' wire form, one of :data:`VECTOR_ENCODINGS`.
    """

    dtype: str = DEFAULT_WIRE_DTYPE
    normalize: bool = False
    dimensions: int = 0
    vector_encoding: str = "float"

    def check(self, retrieval_dim: int) -> None:
        """Refuse settings that a model whose retrieval vectors have ``retrieval_dim`` components
        (0: no retrieval recipe) cannot honour. Raises :class:`InvalidInputError`."""
        if self.dtype not in WIRE_DTYPES:
            raise InvalidInputError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(WIRE_DTYPES)}")
        if self.dimensions and not 0 < self.dimensions <= retrieval_dim:
            limit = f"at most {retrieval_dim}" if retrieval_dim else "0: the model has no retrieval recipe"
            raise InvalidInputError(f"dimensions={self.dimensions} is out of range ({limit})")
        if self.vector_encoding not in VECTOR_ENCODINGS:
            raise InvalidInputError(
                f"unknown vector encoding {self.vector_encoding!r}; expected one of {', '.join(VECTOR_ENCODINGS)}"
            )
