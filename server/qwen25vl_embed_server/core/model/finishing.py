"""One request's outputs finished: image rows, pooling, normalisation, the retrieval heads (the
recipe's composed steps, :mod:`~qwen25vl_embed_server.core.retrieval.heads`), and one device ->
host copy per tensor in the wire dtype (or the retrieval vectors' encoding)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np
import torch
from torch.nn import functional

from qwen25vl_embed_server.core.errors import InvalidInputError, quoted
from qwen25vl_embed_server.core.model import outputs as names
from qwen25vl_embed_server.core.model.dtypes import TORCH_DTYPES
from qwen25vl_embed_server.core.model.loading import LoadedModel
from qwen25vl_embed_server.core.model.pooling import pool
from qwen25vl_embed_server.core.retrieval.heads import Head, RequestRows, encode_vectors, recipe_heads
from qwen25vl_embed_server.core.retrieval.recipes import Recipe

if TYPE_CHECKING:
    from qwen25vl_embed_server.core.model.extractor import Prepared


@dataclass(frozen=True)
class Extraction:
    """The outputs of one request.

    ``tensors`` maps each requested output name to its array (see the proto for shapes), floating
    outputs in the requested wire dtype, integer ones int64. ``image_token_positions`` are the
    0-based positions of the Nv image tokens in the LM sequence of length ``sequence_length``.
    """

    tensors: dict[str, np.ndarray]
    visual_token_lens: np.ndarray
    image_grid_thw: np.ndarray
    image_token_positions: np.ndarray
    sequence_length: int


class Finisher:
    """Finishes the outputs of requests run on ``loaded``: what :meth:`finish` adds to the forward's
    tensors is the same whether a request ran in a batch or in pieces."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self._merge_unit = int(loaded.visual.spatial_merge_size) ** 2
        self._image_token_id = int(loaded.model.config.image_token_id)
        config = loaded.model.config
        # Each output's head, for the model's own recipe ("") and each adapter's.
        self._heads: dict[str, dict[str, Head]] = {
            "": recipe_heads(loaded.recipe, loaded.head, config) if loaded.recipe is not None else {},
            **{name: recipe_heads(a.recipe, a.head, config) for name, a in loaded.adapters.items()},
        }

    def finish(self, item: Prepared, out: dict[str, torch.Tensor]) -> Extraction:
        """Derived outputs (image rows, pools), then one device -> host copy per tensor."""
        inputs = item.inputs
        grid = item.image_grid_thw
        lens = grid.prod(-1) // self._merge_unit
        positions = (inputs["input_ids"][0] == self._image_token_id).nonzero().flatten()
        out[names.VISUAL_TOKEN_LENS] = lens
        out[names.IMAGE_GRID_THW] = grid
        if names.LM_LAST_HIDDEN in out:
            out[names.LM_IMAGE_TOKENS] = out[names.LM_LAST_HIDDEN][0, positions.to(self.loaded.device)]
        heads = self._heads[item.adapter or ""]
        if asked := [name for name in heads if name in item.plan.names]:
            input_ids = inputs["input_ids"].to(self.loaded.device)
            rows = RequestRows(input_ids, item.task, item.settings.dimensions, item.lora)
            for name in asked:
                out[name] = heads[name](out[names.LM_LAST_HIDDEN], rows)
        settings = item.settings
        wire = TORCH_DTYPES[settings.dtype]
        arrays = {}
        for name in item.plan.names:
            tensor = pool(name, out) if name in names.POOLED else out[name]
            if settings.normalize and name in names.POOLED:
                tensor = functional.normalize(tensor, p=2.0, dim=-1)
            if name in heads and settings.vector_encoding != "float":
                arrays[name] = encode_vectors(to_numpy(tensor, torch.float32), settings.vector_encoding)
            else:
                arrays[name] = to_numpy(tensor, wire)
        return Extraction(
            tensors=arrays,
            visual_token_lens=lens.numpy(),
            image_grid_thw=grid.numpy(),
            image_token_positions=positions.numpy(),
            sequence_length=item.sequence_length,
        )


def serving(loaded: LoadedModel, adapter: str | None) -> tuple[Recipe | None, Any]:
    """``(recipe, head)`` of the adapter a request names (None or "": the model's own).

    Raises:
        InvalidInputError: an adapter the model does not serve (naming those it serves).
    """
    if not adapter:
        return loaded.recipe, loaded.head
    served = loaded.adapters.get(adapter)
    if served is None:
        known = ", ".join(loaded.adapters) if loaded.adapters else "none (serve --adapter NAME=PATH)"
        raise InvalidInputError(f"unknown adapter {quoted(adapter)}; this server's adapters: {known}")
    return served.recipe, served.head


def to_numpy(tensor: torch.Tensor, wire: torch.dtype) -> np.ndarray:
    """One device -> host copy, already in the wire dtype (integers stay int64)."""
    if not tensor.is_floating_point():
        return tensor.to(torch.int64).cpu().numpy()
    tensor = tensor.to(wire).contiguous()
    if wire == torch.bfloat16:  # numpy has no bfloat16: move the bits, view them as ml_dtypes'
        return tensor.view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16)
    return tensor.cpu().numpy()
