"""Per-request limits: how much one request may ask of the server. Values only: the checks are in
:mod:`~qwen25vl_embed_server.core.admission.request`, the flags that set them in the CLI.

Order of the checks in a request's life:
1. the transport: the whole message <= ``max_request_bytes`` (gRPC refuses it on receive, with
   RESOURCE_EXHAUSTED, before the request is even parsed);
2. ``request.check_request``: image count, bytes per image, prompt length in characters (no decoding);
3. ``image_decoding.decode_image(..., max_pixels=limits.max_pixels)``: declared width x height,
   from the header, before pixels are decoded;
4. ``request.estimate_request``: the least the request can cost in tokens, from the declared
   sizes (the processor's resize is known), against ``max_request_tokens``, before decoding;
5. ``request.check_prompt_tokens``: the prompt's token count, and no image/video placeholder tokens;
6. ``request.check_cost``: the exact cost after preprocessing against ``max_request_tokens``.

Every refusal is a :class:`~qwen25vl_embed_server.core.errors.LimitExceededError` that names the
limit and its value.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

MIB = 1 << 20
DEFAULT_MAX_PIXELS = 50_000_000
# A token of the prompt covers at most this many characters in practice (long whitespace runs are
# the longest Qwen tokens); a prompt over max_prompt_tokens * this is refused without tokenizing it.
PROMPT_CHARS_PER_TOKEN = 32
MAX_REQUEST_ID_CHARS = 256


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
        max_request_tokens: most work in one request, in tokens: vision patches, plus the LM
            sequence when the language model runs. The default takes one image at the released
            checkpoints' largest resize (65,536 patches + 16,384 image tokens) with room to spare.
    """

    max_request_bytes: int = 64 * MIB
    max_images: int = 16
    max_image_bytes: int = 20 * MIB
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_prompt_tokens: int = 8192
    max_request_tokens: int = 131_072

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{item.name} must be a positive integer, got {value!r}")

    @property
    def max_prompt_chars(self) -> int:
        """The prompt length, in characters, past which it is refused without tokenizing it."""
        return self.max_prompt_tokens * PROMPT_CHARS_PER_TOKEN
