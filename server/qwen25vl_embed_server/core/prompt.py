"""Images + prompt -> the model's inputs, through the checkpoint's own processor and chat template."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from qwen25vl_embed_server.core.errors import InvalidInputError


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


def prepare_inputs(
    processor: Any, images: Sequence[Image.Image], prompt: str, pixels: tuple[int, int] | None = None
) -> Any:
    """The processor's ``BatchFeature`` (CPU tensors) for one multi-image prompt.

    ``pixels``: (min, max) resize range of this call, passed to the processor as an argument (the
    processor, which other requests share, is never changed); None: the processor's own.

    Keys: input_ids [1, T], attention_mask [1, T], mm_token_type_ids [1, T] (drives M-RoPE),
    pixel_values [Np, C*t*p*p], image_grid_thw [num_images, 3].
    """
    if not images:
        raise InvalidInputError("the request has no image; send at least one")
    text = render_prompt(processor, len(images), prompt)
    try:
        if pixels is None:
            return processor(text=[text], images=list(images), return_tensors="pt")
        size = {"shortest_edge": pixels[0], "longest_edge": pixels[1]}
        return processor(text=[text], images=list(images), return_tensors="pt", size=size)
    except ValueError as err:  # e.g. aspect ratio beyond the processor's limit
        sizes = ", ".join(f"{im.width}x{im.height}" for im in images)
        raise InvalidInputError(f"the processor rejected the image(s) ({sizes}): {err}") from err
