"""Request limits: how much one request may ask of the server, checked before the work starts.

Each limit has a ``serve`` flag; every refusal is an :class:`InvalidInputError` (INVALID_ARGUMENT)
naming the limit, its value and the flag, except ``max_request_bytes``, which gRPC enforces itself
on receive (RESOURCE_EXHAUSTED, before the request is even parsed).

Order of the checks in a request's life:
1. gRPC: the whole message <= ``max_request_bytes``.
2. :func:`check_request`: image count, bytes per image, prompt length in characters (no decoding).
3. ``decoding.decode_image(..., max_pixels=limits.max_pixels)``: declared width x height, from the
   header, before pixels are decoded.
4. :func:`check_prompt_tokens`: the prompt's token count, and no image/video placeholder tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the request type only: this module (used by decoding) stays free of gRPC code
    from qwen25vl_embed.v1 import embed_pb2 as pb

from .errors import InvalidInputError

MIB = 1 << 20
DEFAULT_MAX_PIXELS = 50_000_000
# A token of the prompt covers at most this many characters in practice (long whitespace runs are
# the longest Qwen tokens); a prompt over max_prompt_tokens * this is refused without tokenizing it.
PROMPT_CHARS_PER_TOKEN = 32
# Placeholder tokens that the processor expands or counts: in a user prompt they would be taken for
# images or videos that the request does not have.
RESERVED_PROMPT_TOKENS: tuple[str, ...] = (
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
)

_FLAGS = {
    "max_request_bytes": "--max-request-bytes",
    "max_images": "--max-images",
    "max_image_bytes": "--max-image-bytes",
    # --max-pixels is the processor's resize target; this is the decoder's refusal threshold.
    "max_pixels": "--max-image-pixels",
    "max_prompt_tokens": "--max-prompt-tokens",
}


@dataclass(frozen=True)
class Limits:
    """Per-request limits. The defaults let any normal photo and prompt through.

    Attributes:
        max_request_bytes: largest request message on the wire (gRPC's max_receive_message_length).
        max_images: most images in one request.
        max_image_bytes: largest encoded image.
        max_pixels: largest decoded image, width x height; far above the processor's own resize
            target (12.8 M pixels for the released checkpoints), so it only stops bombs.
        max_prompt_tokens: longest prompt (the user text, before the chat template), in tokens.
    """

    max_request_bytes: int = 64 * MIB
    max_images: int = 16
    max_image_bytes: int = 20 * MIB
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_prompt_tokens: int = 8192

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{item.name} ({_FLAGS[item.name]}) must be a positive integer, got {value!r}")

    @property
    def max_prompt_chars(self) -> int:
        """The prompt length, in characters, past which it is refused without tokenizing it."""
        return self.max_prompt_tokens * PROMPT_CHARS_PER_TOKEN


def flag_for(limit: str) -> str:
    """The ``serve`` flag that sets the limit named ``limit`` (a :class:`Limits` field name)."""
    return _FLAGS[limit]


def check_request(request: pb.ImageRequest, limits: Limits) -> None:
    """Cheap checks on a parsed request, before anything is decoded or tokenized.

    Raises:
        InvalidInputError: no image, more than ``max_images`` images, an image over
            ``max_image_bytes``, or a prompt over ``limits.max_prompt_chars`` characters.
    """
    count = len(request.images)
    if count == 0:
        raise InvalidInputError("the request has no image; send at least one")
    if count > limits.max_images:
        raise InvalidInputError(
            f"request has {count} images; the limit is {limits.max_images} ({flag_for('max_images')})"
        )
    for index, image in enumerate(request.images):
        size = len(image.data)
        if size > limits.max_image_bytes:
            raise InvalidInputError(
                f"image {index} is {size} bytes; the limit is {limits.max_image_bytes} ({flag_for('max_image_bytes')})"
            )
    if request.HasField("prompt"):
        _check_prompt_chars(request.prompt, limits)


def check_prompt_tokens(tokenizer: Any, prompt: str, limits: Limits) -> int:
    """Count the prompt's tokens (without special tokens) and check them.

    Fast (Rust) tokenizers are not thread-safe: concurrent calls on one tokenizer object can fail
    with "RuntimeError: Already borrowed" (huggingface/tokenizers#537). Call this on the thread
    that runs the processor (the model thread), or give it a private copy of the tokenizer
    (``copy.deepcopy(processor.tokenizer)``) used from one thread only.

    Args:
        tokenizer: the checkpoint's tokenizer (``processor.tokenizer``): anything with
            ``encode(text, add_special_tokens=False) -> list[int]``.
        prompt: the user text, as the request gives it (before the chat template).
        limits: the limits in force.

    Returns:
        The number of tokens.

    Raises:
        InvalidInputError: the prompt holds an image/video placeholder token
            (:data:`RESERVED_PROMPT_TOKENS`), or has more than ``max_prompt_tokens`` tokens.
    """
    _check_prompt_chars(prompt, limits)
    for token in RESERVED_PROMPT_TOKENS:
        if token in prompt:
            raise InvalidInputError(
                f"the prompt contains {token}, which is reserved for images and videos; remove it "
                "(images go in ImageRequest.images)"
            )
    count = len(tokenizer.encode(prompt, add_special_tokens=False)) if prompt else 0
    if count > limits.max_prompt_tokens:
        raise InvalidInputError(
            f"prompt has {count} tokens; the limit is {limits.max_prompt_tokens} ({flag_for('max_prompt_tokens')})"
        )
    return count


def _check_prompt_chars(prompt: str, limits: Limits) -> None:
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidInputError(
            f"prompt has {len(prompt)} characters; the limit is {limits.max_prompt_chars} "
            f"({PROMPT_CHARS_PER_TOKEN} per token of {flag_for('max_prompt_tokens')} {limits.max_prompt_tokens})"
        )
