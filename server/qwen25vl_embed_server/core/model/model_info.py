"""What a loaded model is, as callers may know it: a small typed value, torch-free."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from qwen25vl_embed_server.core.retrieval.recipes import MULTI_VECTOR, Recipe


@dataclass(frozen=True)
class RecipeInfo(Recipe):
    """The retrieval recipe in force (see :class:`~.recipes.Recipe`), with its vectors' sizes:
    ``dimension``, its default output's; ``multi_vector_dimension``, each multi-vector row's where it
    serves one (0 where not)."""

    dimension: int = 0
    multi_vector_dimension: int = 0

    @classmethod
    def of(cls, recipe: Recipe, dimension: int, head: Any = None) -> RecipeInfo:
        """``head``: its projection head (a linear layer's ``out_features``), None without one."""
        if MULTI_VECTOR not in recipe.outputs:
            multi = 0
        else:
            multi = dimension if recipe.output == MULTI_VECTOR or head is None else int(head.out_features)
        return cls(**asdict(recipe), dimension=dimension, multi_vector_dimension=multi)


@dataclass(frozen=True)
class AdapterInfo:
    """One retrieval adapter served beside the base: the ``name`` requests use and its ``recipe``."""

    name: str
    recipe: RecipeInfo

    @classmethod
    def of(cls, adapter: Any) -> AdapterInfo:
        """From a served adapter (:class:`~.retrieval.adapters.ServedAdapter`)."""
        return cls(adapter.name, RecipeInfo.of(adapter.recipe, adapter.dimension, adapter.head))


@dataclass(frozen=True)
class ModelInfo:
    """The model's facts (the proto's InfoResponse carries them; see its field comments).

    ``min_pixels`` / ``max_pixels``: the processor's resize range (width x height), as loaded.
    ``outputs``: every output name this model serves; ``default_outputs``: those of a request
    that names none. ``load_seconds``: how long loading took. ``recipe``: the retrieval recipe,
    None for a model served as raw states. ``arithmetic``: how the dot products run (one of
    :data:`~.defaults.ARITHMETICS`). ``adapters``: the retrieval adapters served beside the base.
    """

    model: str
    device: str
    dtype: str
    vision_hidden_size: int
    hidden_size: int
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    outputs: tuple[str, ...]
    default_outputs: tuple[str, ...]
    num_lm_layers: int
    num_vision_layers: int
    load_seconds: float
    recipe: RecipeInfo | None = None
    arithmetic: str = "exact"
    adapters: tuple[AdapterInfo, ...] = ()
