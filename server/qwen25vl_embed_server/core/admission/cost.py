"""What a request costs, in tokens and bytes, known before the model runs.

- Before decoding, from the images' declared sizes: the processor resizes each image with
  ``smart_resize`` (sides rounded to ``patch_size * merge_size``, pixel count within the
  processor's min/max), so the patch count of every image is known from its header alone
  (:func:`image_patches`). That bounds memory before a pixel is decoded.
- After preprocessing, exactly: :attr:`Prepared.cost` (vision patches + LM sequence when the LM
  runs) and :func:`result_bytes` (every requested output's bytes, from the shapes in the proto).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qwen25vl_embed_server.core.model import outputs as names
from qwen25vl_embed_server.core.model.outputs import OutputPlan
from qwen25vl_embed_server.core.retrieval.recipes import MULTI_VECTOR, SINGLE_VECTOR


def image_patches(width: int, height: int, image_processor: Any, pixels: tuple[int, int] | None = None) -> int:
    """Vision patches (rows of ``pixel_values``) the processor makes of a still image of this size,
    at the resize range ``pixels`` (min, max; None: the processor's own).

    Raises ValueError for sizes the processor refuses (e.g. an aspect ratio over 200).
    """
    # Imported here: admission loads without torch, which transformers' image processing brings.
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    patch = int(image_processor.patch_size)
    factor = patch * int(image_processor.merge_size)
    size = image_processor.size
    low, high = pixels if pixels is not None else (int(size["shortest_edge"]), int(size["longest_edge"]))
    resized_height, resized_width = smart_resize(height, width, factor=factor, min_pixels=low, max_pixels=high)
    return int(resized_height // patch) * int(resized_width // patch)


def tokens_before_decoding(patches: Sequence[int], merge_unit: int, plan: OutputPlan) -> int:
    """The least a request of images with ``patches`` can cost (the prompt adds to it): its
    patches, and its image tokens when the language model runs."""
    total = sum(patches)
    return total + (total // merge_unit if plan.needs_lm else 0)


def result_bytes(
    plan: OutputPlan,
    num_images: int,
    num_patches: int,
    sequence_length: int,
    merge_unit: int,
    vision_hidden: int,
    hidden: int,
    dtype: str,
    retrieval_dim: int = 0,
) -> int:
    """Bytes of the request's outputs (what its response holds), from their shapes in the proto;
    the retrieval vectors (``retrieval_dim`` wide) are counted as float32, their largest form."""
    from qwen25vl_embed_server.core.model.dtypes import TORCH_DTYPES  # torch: see image_patches

    item = TORCH_DTYPES[dtype].itemsize
    image_tokens = num_patches // merge_unit
    rows = {
        names.VISION_TOKENS: num_patches * vision_hidden,
        names.PROJECTED_TOKENS: image_tokens * hidden,
        names.LM_LAST_HIDDEN: sequence_length * hidden,
        names.LM_IMAGE_TOKENS: image_tokens * hidden,
        names.VISION_POOLED_MEAN: vision_hidden,
        names.PROJECTED_POOLED_MEAN: hidden,
        names.LM_POOLED_MEAN: hidden,
        names.LM_IMAGE_POOLED_MEAN: hidden,
        names.LM_LAST_TOKEN: hidden,
    }
    total = 0
    for name in plan.names:
        if name in rows:
            total += rows[name] * item
        elif name == names.VISUAL_TOKEN_LENS:  # int64
            total += num_images * 8
        elif name == names.IMAGE_GRID_THW:
            total += num_images * 3 * 8
        elif name == MULTI_VECTOR:
            total += sequence_length * retrieval_dim * 4
        elif name == SINGLE_VECTOR:
            total += retrieval_dim * 4
    total += sum(len(aliases) for aliases in plan.lm_layers.values()) * sequence_length * hidden * item
    total += sum(len(aliases) for aliases in plan.vision_layers.values()) * num_patches * vision_hidden * item
    return total
