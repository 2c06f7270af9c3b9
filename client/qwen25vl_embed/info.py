"""What a server reports about its model: ``InfoResponse`` as a typed, immutable value."""

from __future__ import annotations

from dataclasses import dataclass

from qwen25vl_embed.v1 import embed_pb2 as pb

__all__ = ["RetrievalRecipe", "ServedAdapter", "ServerInfo"]


@dataclass(frozen=True)
class RetrievalRecipe:
    """The server's retrieval recipe (fields as in the proto's ``Recipe``).

    Attributes:
        name: "colqwen2.5" or "biqwen2.5".
        output: "multi_vector" ([T, E] per request) or "single_vector" ([1, E]).
        dimension: E at full width (the ceiling of ``dimensions``).
        document_template: the document text, "<image>" where the image goes.
        query_prefix, query_suffix: around a query's text.
        padding_side, pooling, head, normalize, image_tokens_only: as the reference computes.
        tasks: the tasks a request may name (``task=``), the default first; empty: none.
        matryoshka_dims: the single vector's sizes ``dimensions`` may take; empty: any.
        outputs: every output it serves, ``output`` first (jina-v4: single and multi vectors).
        multi_vector_dimension: each multi-vector row's size where it serves one; 0 where not.
    """

    name: str
    output: str
    dimension: int
    document_template: str
    query_prefix: str
    query_suffix: str
    padding_side: str
    pooling: str
    head: bool
    normalize: bool
    image_tokens_only: bool
    tasks: tuple[str, ...] = ()
    matryoshka_dims: tuple[int, ...] = ()
    outputs: tuple[str, ...] = ()
    multi_vector_dimension: int = 0

    @classmethod
    def from_proto(cls, message: pb.Recipe) -> RetrievalRecipe:
        return cls(
            name=message.name,
            output=message.output,
            dimension=message.dimension,
            document_template=message.document_template,
            query_prefix=message.query_prefix,
            query_suffix=message.query_suffix,
            padding_side=message.padding_side,
            pooling=message.pooling,
            head=message.head,
            normalize=message.normalize,
            image_tokens_only=message.image_tokens_only,
            tasks=tuple(message.tasks),
            matryoshka_dims=tuple(message.matryoshka_dims),
            outputs=tuple(message.outputs),
            multi_vector_dimension=message.multi_vector_dimension,
        )


@dataclass(frozen=True)
class ServedAdapter:
    """A retrieval adapter the server runs on its base: ``name`` (what ``adapter=`` takes) and its
    ``recipe`` (its output, dimension and prompt formats)."""

    name: str
    recipe: RetrievalRecipe

    @classmethod
    def from_proto(cls, message: pb.Adapter) -> ServedAdapter:
        return cls(name=message.name, recipe=RetrievalRecipe.from_proto(message.recipe))


@dataclass(frozen=True)
class ServerInfo:
    """The loaded model and what the server can produce (fields as in ``InfoResponse``).

    Attributes:
        model: model id or path, e.g. "Qwen/Qwen2.5-VL-7B-Instruct".
        device: device the model runs on, e.g. "cuda", "cuda:1", "mps", "cpu".
        dtype: compute dtype of the model: "float32", "float16" or "bfloat16".
        vision_hidden_size: Cv, the last axis of vision_tokens.
        hidden_size: D, the last axis of the projector and LM outputs.
        patch_size: side of a vision patch, in pixels.
        spatial_merge_size: patches merged per side by the projector.
        temporal_patch_size: frames per temporal patch.
        min_pixels: images are resized to at least this many pixels.
        max_pixels: images are resized to at most this many pixels.
        outputs: every output name the server can produce.
        default_outputs: the outputs sent when a request names none.
        num_lm_layers: LM decoder layers (valid k of lm_layer_<k>).
        num_vision_layers: vision blocks (valid k of vision_layer_<k>).
        chunk_bytes: largest response message the server sends, in bytes.
        server_version: the server package's version.
        recipe: the retrieval recipe, None for a model served as raw states.
        arithmetic: how the model's dot products run: "exact" (transformers' own kernels: its
            bits), "fp32-onednn" (within float rounding) or "bf16-float32" (bf16 in float32
            arithmetic: within bf16 rounding of the fp32 result); "" from an older server.
        adapters: the retrieval adapters served on the base, in the server's order (empty: none).
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
    chunk_bytes: int
    server_version: str
    recipe: RetrievalRecipe | None = None
    arithmetic: str = ""
    adapters: tuple[ServedAdapter, ...] = ()

    @classmethod
    def from_proto(cls, message: pb.InfoResponse) -> ServerInfo:
        """The ``ServerInfo`` for an ``InfoResponse`` message."""
        return cls(
            model=message.model,
            device=message.device,
            dtype=message.dtype,
            vision_hidden_size=message.vision_hidden_size,
            hidden_size=message.hidden_size,
            patch_size=message.patch_size,
            spatial_merge_size=message.spatial_merge_size,
            temporal_patch_size=message.temporal_patch_size,
            min_pixels=message.min_pixels,
            max_pixels=message.max_pixels,
            outputs=tuple(message.outputs),
            default_outputs=tuple(message.default_outputs),
            num_lm_layers=message.num_lm_layers,
            num_vision_layers=message.num_vision_layers,
            chunk_bytes=message.chunk_bytes,
            server_version=message.server_version,
            recipe=RetrievalRecipe.from_proto(message.recipe) if message.HasField("recipe") else None,
            arithmetic=message.arithmetic,
            adapters=tuple(ServedAdapter.from_proto(adapter) for adapter in message.adapters),
        )
