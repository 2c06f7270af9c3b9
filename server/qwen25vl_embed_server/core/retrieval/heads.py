"""Retrieval heads as composable steps: pooling, projection, masking, normalisation, Matryoshka truncation.

A recipe's head is an ordered :class:`Head` of small steps, each a frozen value that maps one
request's vectors to the next (:func:`recipe_heads` composes them per output):

- ColQwen2.5 multi-vector: ``Project(custom_text_proj) -> Normalize -> MaskNonImage? -> Rows -> Truncate``;
- BiQwen2.5 single vector: ``Pool("last" | "mean") -> Normalize -> Truncate``;
- jina-embeddings-v4 single vector: ``Pool("span_mean") -> Normalize -> Truncate`` (Matryoshka);
  multi-vector: ``Project(multi_vector_projector, the task's LoRA) -> Normalize -> Rows``.

The ColQwen2.5 / BiQwen2.5 steps follow ``ColQwen2_5.forward`` / ``BiQwen2_5.forward`` of
colpali-engine 0.3.18 operation for operation (head in the model's dtype, ``x / x.norm()``,
multiplication by the masks), on one request's unpadded rows ``[1, T, D]``: a request alone is then
bit-identical to the reference in fp32, and in a batch within floating-point reordering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.nn import functional

from qwen25vl_embed_server.core.model.output_settings import VECTOR_ENCODINGS
from qwen25vl_embed_server.core.retrieval import lora
from qwen25vl_embed_server.core.retrieval.recipes import MULTI_VECTOR, SINGLE_VECTOR, Recipe

__all__ = [
    "VECTOR_ENCODINGS",
    "Head",
    "MaskNonImage",
    "Normalize",
    "Pool",
    "Project",
    "RequestRows",
    "Rows",
    "Step",
    "Truncate",
    "encode_vectors",
    "recipe_heads",
]


@dataclass(frozen=True)
class RequestRows:
    """What a step may read besides the vectors: one request's ``input_ids`` ``[1, T]`` (on the
    vectors' device), its task ("" for a recipe without tasks), its Matryoshka size (0: all), the
    key of the LoRA it computes with (:func:`~.lora.lora_key`; None: the base)."""

    input_ids: torch.Tensor
    task: str = ""
    dimensions: int = 0
    lora: str | None = None


class Step(Protocol):
    def __call__(self, vectors: torch.Tensor, rows: RequestRows) -> torch.Tensor: ...


@dataclass(frozen=True)
class Pool:
    """``[1, T, D]`` -> ``[1, D]``: "last" (the final token), "mean" (over the tokens) or
    "span_mean" (over the first image's vision span, from its vision-start to its vision-end
    token inclusive; over the tokens for a text)."""

    method: str
    vision_start_id: int = -1
    vision_end_id: int = -1

    def __call__(self, vectors: torch.Tensor, rows: RequestRows) -> torch.Tensor:
        if self.method == "last":
            return vectors[:, -1]
        mask = torch.ones(vectors.shape[:2], dtype=torch.int64, device=vectors.device)
        if self.method == "span_mean":
            ids = rows.input_ids[0]
            starts = (ids == self.vision_start_id).nonzero().flatten()
            ends = (ids == self.vision_end_id).nonzero().flatten()
            if len(starts) and len(ends):
                positions = torch.arange(ids.shape[0], device=vectors.device)
                mask = ((positions >= starts[0]) & (positions <= ends[-1])).to(torch.int64).unsqueeze(0)
        elif self.method != "mean":
            raise ValueError(f"unknown pooling {self.method!r}; expected last, mean or span_mean")
        mask = mask.unsqueeze(-1)
        pooled: torch.Tensor = (vectors * mask).sum(dim=1) / mask.sum(dim=1)
        return pooled


@dataclass(frozen=True)
class Project:
    """A projection head on every vector; with the request's LoRA beside it when the projector
    carries one (jina-embeddings-v4's is a :class:`~.lora.MultiLoraLinear` with each task's)."""

    module: Any

    def __call__(self, vectors: torch.Tensor, rows: RequestRows) -> torch.Tensor:
        if not rows.lora:
            projected: torch.Tensor = self.module(vectors)
            return projected
        with lora.adapter_rows([rows.lora]):
            projected = self.module(vectors)
        return projected


@dataclass(frozen=True)
class Normalize:
    """Each vector L2-normalised, as the references write it: ``x / x.norm(dim=-1, keepdim=True)``."""

    def __call__(self, vectors: torch.Tensor, rows: RequestRows) -> torch.Tensor:
        normalized: torch.Tensor = vectors / vectors.norm(dim=-1, keepdim=True)
        return normalized


@dataclass(frozen=True)
class MaskNonImage:
    """Rows of non-image tokens zeroed when the request has images (ColQwen2.5's ``mask_non_image_embeddings``)."""

    image_token_id: int

    def __call__(self, vectors: torch.Tensor, rows: RequestRows) -> torch.Tensor:
        image_rows = rows.input_ids == self.image_token_id
        if not bool(image_rows.any()):
            return vectors
        masked: torch.Tensor = vectors * image_rows.unsqueeze(-1).to(vectors.device)
        return masked


@dataclass(frozen=True)
class Rows:
    """``[1, T, E]`` -> ``[T, E]``: one vector per token of the request."""

    def __call__(self, vectors: torch.Tensor, rows: RequestRows) -> torch.Tensor:
        return vectors[0]


@dataclass(frozen=True)
class Truncate:
    """Matryoshka truncation to the request's ``dimensions``: the first components, L2-renormalised
    (zero rows stay zero). 0 or the full size: unchanged."""

    def __call__(self, vectors: torch.Tensor, rows: RequestRows) -> torch.Tensor:
        if rows.dimensions in (0, vectors.shape[-1]):
            return vectors
        return functional.normalize(vectors[..., : rows.dimensions], p=2.0, dim=-1)


@dataclass(frozen=True)
class Head:
    """An ordered composition of steps: ``last_hidden`` ``[1, T, D]`` -> the output's vectors."""

    steps: tuple[Step, ...]

    def __call__(self, last_hidden: torch.Tensor, rows: RequestRows) -> torch.Tensor:
        vectors = last_hidden
        for step in self.steps:
            vectors = step(vectors, rows)
        return vectors


def recipe_heads(recipe: Recipe, projection: Any, config: Any) -> dict[str, Head]:
    """The head of each output ``recipe`` serves (:attr:`~.recipes.Recipe.outputs`), given its
    projection module (None without one) and the model's config (its special token ids)."""
    heads: dict[str, Head] = {}
    if MULTI_VECTOR in recipe.outputs:
        assert projection is not None, "a multi-vector recipe loads its projection head"
        masking: tuple[Step, ...] = (MaskNonImage(int(config.image_token_id)),) if recipe.image_tokens_only else ()
        heads[MULTI_VECTOR] = Head((Project(projection), Normalize(), *masking, Rows(), Truncate()))
    if SINGLE_VECTOR in recipe.outputs:
        pool = Pool(recipe.pooling, int(config.vision_start_token_id), int(config.vision_end_token_id))
        heads[SINGLE_VECTOR] = Head((pool, Normalize(), Truncate()))
    return heads


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
