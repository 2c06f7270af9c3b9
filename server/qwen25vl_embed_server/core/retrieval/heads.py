"""Retrieval outputs from the last hidden states, computed as colpali-engine 0.3.18 computes them.

Operations follow ``ColQwen2_5.forward`` / ``BiQwen2_5.forward`` step for step (head in the
model's dtype, ``x / x.norm()``, multiplication by the masks), on one request's unpadded rows
``[1, T, D]``: a request alone is then bit-identical to the reference in fp32, and in a batch
(the reference's left padding, our right padding) within floating-point reordering.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional

from qwen25vl_embed_server.core.model.output_settings import VECTOR_ENCODINGS
from qwen25vl_embed_server.core.retrieval.recipes import Recipe

__all__ = ["VECTOR_ENCODINGS", "encode_vectors", "multi_vector", "single_vector", "truncate"]


def multi_vector(
    last_hidden: torch.Tensor, head: torch.nn.Module, input_ids: torch.Tensor, image_token_id: int, recipe: Recipe
) -> torch.Tensor:
    """One L2-normalised vector per token, ``[T, dim]``.

    ``last_hidden``: ``[1, T, D]``; ``input_ids``: ``[1, T]``. With ``recipe.image_tokens_only``
    and images in the request, rows of non-image tokens are zero (the reference's masking).
    """
    projected: torch.Tensor = head(last_hidden)
    projected = projected / projected.norm(dim=-1, keepdim=True)
    # The reference multiplies by the attention mask: all ones on a request's own rows.
    image_rows = input_ids == image_token_id
    if recipe.image_tokens_only and bool(image_rows.any()):
        projected = projected * image_rows.unsqueeze(-1).to(projected.device)
    return projected[0]


def single_vector(last_hidden: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """One L2-normalised vector ``[1, D]``: the final token or the mean over tokens (``recipe.pooling``)."""
    if recipe.pooling == "last":
        pooled = last_hidden[:, -1]
    elif recipe.pooling == "mean":
        mask = torch.ones(last_hidden.shape[:2], dtype=torch.int64, device=last_hidden.device).unsqueeze(-1)
        pooled = (last_hidden * mask).sum(dim=1) / mask.sum(dim=1)
    else:
        raise ValueError(f"recipe {recipe.name}: pooling {recipe.pooling!r} gives no single vector")
    normalized: torch.Tensor = pooled / pooled.norm(dim=-1, keepdim=True)
    return normalized


def truncate(vectors: torch.Tensor, dimensions: int) -> torch.Tensor:
    """Matryoshka truncation: the first ``dimensions`` components, L2-renormalised (zero rows stay
    zero). ``dimensions`` 0 or the full size: unchanged."""
    if dimensions in (0, vectors.shape[-1]):
        return vectors
    return functional.normalize(vectors[..., :dimensions], p=2.0, dim=-1)


def encode_vectors(vectors: np.ndarray, encoding: str) -> np.ndarray:
    """Retrieval vectors (float32, rows L2-normalised) in a compact wire form.

    "int8": ``round(v * 127)`` clipped to [-127, 127], int8, same shape. "binary": 1 bit per
    component (``v > 0``), packed 8 per byte, first component in the most significant bit:
    uint8 ``[..., ceil(E / 8)]``. "float": unchanged.
    """
    if encoding == "float":
        return vectors
    if encoding == "int8":
        return np.clip(np.rint(vectors * 127.0), -127, 127).astype(np.int8)
    if encoding == "binary":
        return np.packbits(vectors > 0, axis=-1, bitorder="big")
    raise ValueError(f"unknown vector encoding {encoding!r}; expected one of {', '.join(VECTOR_ENCODINGS)}")
