"""Images + prompt -> the model's inputs, through the checkpoint's own processor.

Prompt formats (:data:`PROMPT_FORMATS`):

- ``chat`` (default): one user turn, the images then the prompt, rendered by the checkpoint's chat
  template (its default system turn included) with the generation prompt.
- ``raw``: the caller writes the whole text; each :data:`~.recipes.IMAGE_PLACEHOLDER` becomes the
  model's vision span, one per image, in order (counts must match).
- ``query``: the retrieval recipe's query format around the prompt (no image).
- ``document``: the retrieval recipe's document template around the image(s) (no prompt); or,
  for a recipe with text documents (jina-embeddings-v4's passages), its passage format around
  the prompt (no image).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from qwen25vl_embed_server.core.errors import InvalidInputError
from qwen25vl_embed_server.core.retrieval.recipes import IMAGE_PLACEHOLDER, VISION_SPAN, Recipe

PROMPT_FORMATS = ("chat", "raw", "query", "document")


def render_prompt(processor: Any, num_images: int, prompt: str) -> str:
    """One user turn holding ``num_images`` images then ``prompt``, with the generation prompt.

    The chat template adds its default system turn, as the model saw in training.
    """
    content: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
    if prompt:
        content.append({"type": "text", "text": prompt})
    messages = [{"role": "user", "content": content}]
    text: str = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text


def render_text(
    processor: Any, num_images: int, prompt: str, prompt_format: str, recipe: Recipe | None, task: str = ""
) -> str:
    """The model's whole input text for a request in ``prompt_format`` (``task``: the recipe's task,
    for recipes whose text formats depend on it). Raises InvalidInputError for a format the model
    cannot serve or placeholders that do not match the images."""
    if prompt_format == "chat":
        return render_prompt(processor, num_images, prompt)
    if prompt_format == "raw":
        return expand_placeholders(prompt, num_images)
    if prompt_format not in PROMPT_FORMATS:
        raise InvalidInputError(f"unknown prompt format {prompt_format!r}; expected one of {', '.join(PROMPT_FORMATS)}")
    if recipe is None:
        raise InvalidInputError(f"the {prompt_format} format needs a retrieval recipe; this server has none")
    if prompt_format == "query":
        if num_images:
            raise InvalidInputError(f"a query has no image; this one has {num_images}")
        return recipe.query_text(prompt)
    if not num_images and prompt:
        if not recipe.passage_prefix:
            raise InvalidInputError(f"the {recipe.name} document format takes an image, not a text")
        return recipe.passage_text(prompt, task)
    return expand_placeholders(recipe.document_template, num_images, what=f"the {recipe.name} document template")


def expand_placeholders(text: str, num_images: int, what: str = "the raw prompt") -> str:
    """``text`` with each :data:`IMAGE_PLACEHOLDER` replaced by the vision span; the count must be
    ``num_images``."""
    count = text.count(IMAGE_PLACEHOLDER)
    if count != num_images:
        raise InvalidInputError(
            f"{what} has {count} image placeholder(s) {IMAGE_PLACEHOLDER} but the request has {num_images} image(s)"
        )
    return text.replace(IMAGE_PLACEHOLDER, VISION_SPAN)


def prepare_inputs(
    processor: Any, images: Sequence[Image.Image], text: str, pixels: tuple[int, int] | None = None
) -> Any:
    """The processor's ``BatchFeature`` (CPU tensors) for one rendered text and its images.

    ``pixels``: (min, max) resize range of this call, passed to the processor as an argument (the
    processor, which other requests share, is never changed); None: the processor's own.

    Keys: input_ids [1, T], attention_mask [1, T], mm_token_type_ids [1, T] (drives M-RoPE); with
    images also pixel_values [Np, C*t*p*p] and image_grid_thw [num_images, 3].
    """
    try:
        if pixels is None or not images:
            return processor(text=[text], images=list(images) or None, return_tensors="pt")
        size = {"shortest_edge": pixels[0], "longest_edge": pixels[1]}
        return processor(text=[text], images=list(images), return_tensors="pt", size=size)
    except ValueError as err:  # e.g. aspect ratio beyond the processor's limit
        sizes = ", ".join(f"{im.width}x{im.height}" for im in images)
        raise InvalidInputError(f"the processor rejected the image(s) ({sizes}): {err}") from err
