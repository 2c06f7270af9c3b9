"""One request as every edge receives it, and the checks and preparation it goes through.

An :class:`EncodedRequest` is transport-neutral: the gRPC servicer, the Ray Serve replica, the
in-process CLI and the bulk job all build one. :func:`prepare_request` is the one chain
``checked -> decoded -> prompt-checked -> processed`` that turns it into a
:class:`~qwen25vl_embed_server.core.model.extractor.Prepared` for the model; the asynchronous
:class:`~qwen25vl_embed_server.core.scheduling.pipeline.Pipeline` runs that chain on worker threads and
the result in batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qwen25vl_embed_server.core.admission.limits import MAX_REQUEST_ID_CHARS, PROMPT_CHARS_PER_TOKEN, Limits
from qwen25vl_embed_server.core.defaults import DEFAULT_PROMPT
from qwen25vl_embed_server.core.errors import InvalidInputError, LimitExceededError
from qwen25vl_embed_server.core.model.output_settings import OutputSettings

if TYPE_CHECKING:  # torch is loaded by the extractor, not by the checks
    from qwen25vl_embed_server.core.model.extractor import Extractor, Prepared
    from qwen25vl_embed_server.core.model.outputs import OutputPlan

# Placeholder tokens that the processor expands or counts: in a user prompt they would be taken for
# images or videos that the request does not have.
RESERVED_PROMPT_TOKENS: tuple[str, ...] = (
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
)


@dataclass(frozen=True)
class EncodedRequest:
    """One request: encoded images, the prompt and what to return.

    Attributes:
        images: the encoded image files, in prompt order.
        prompt: the user text after the images; None: :data:`~.defaults.DEFAULT_PROMPT`.
        outputs: output names; empty: the defaults.
        settings: how the outputs are finished: wire dtype, normalisation, the retrieval vectors'
            size and encoding (:class:`~.output_settings.OutputSettings`).
        request_id: the caller's tag, echoed back.
        prompt_format: "chat", "raw", "query" or "document" (:mod:`~.prompt`).
        min_pixels / max_pixels: this request's resize range (None: the model's), within the
            model's range (:func:`pixel_range`).
        adapter: the retrieval adapter to run with, by name ("": the model's own recipe, or its raw
            states when it serves adapters).
        task: the recipe's task (jina-embeddings-v4: "retrieval", "text-matching", "code"); "":
            the recipe's default.
    """

    images: Sequence[bytes]
    prompt: str | None = None
    outputs: Sequence[str] = ()
    settings: OutputSettings = field(default_factory=OutputSettings)
    request_id: str = ""
    prompt_format: str = "chat"
    min_pixels: int | None = None
    max_pixels: int | None = None
    adapter: str = ""
    task: str = ""

    @property
    def text(self) -> str:
        """The prompt in force (the default applies to the chat format only)."""
        if self.prompt is None:
            return DEFAULT_PROMPT if self.prompt_format == "chat" and self.images else ""
        return self.prompt


def check_request(request: EncodedRequest, limits: Limits) -> None:
    """Cheap checks, before anything is decoded or tokenized.

    Raises:
        InvalidInputError: neither an image nor a prompt, a prompt where the format takes none (or
            none where it needs one), a negative ``dimensions``, or a request id over
            :data:`~.limits.MAX_REQUEST_ID_CHARS`.
        LimitExceededError: more than ``max_images`` images, an image over ``max_image_bytes``, or
            a prompt over ``limits.max_prompt_chars`` characters.
    """
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidInputError(
            f"request_id is {len(request.request_id)} characters; the limit is {MAX_REQUEST_ID_CHARS}"
        )
    count = len(request.images)
    if count == 0 and request.prompt is None:
        raise InvalidInputError("the request has neither an image nor a prompt; send at least one")
    if request.prompt_format in ("raw", "query") and request.prompt is None:
        raise InvalidInputError(f"the {request.prompt_format} format needs a prompt")
    if request.prompt_format == "document" and request.prompt is not None and count:
        raise InvalidInputError(
            "the document format takes no prompt beside an image: the recipe's template is the text"
        )
    if request.settings.dimensions < 0:
        raise InvalidInputError(f"dimensions must be 0 (all) or positive, got {request.settings.dimensions}")
    if count > limits.max_images:
        raise LimitExceededError(
            "max_images", f"request has {count} images; the limit is max_images={limits.max_images}"
        )
    for index, data in enumerate(request.images):
        if len(data) > limits.max_image_bytes:
            raise LimitExceededError(
                "max_image_bytes",
                f"image {index} is {len(data)} bytes; the limit is max_image_bytes={limits.max_image_bytes}",
            )
    if request.prompt is not None:
        _check_prompt_chars(request.prompt, limits)


def check_prompt_tokens(tokenizer: Any, prompt: str, limits: Limits) -> int:
    """Count the prompt's tokens (without special tokens) and check them.

    Args:
        tokenizer: the checkpoint's tokenizer (``processor.tokenizer``): anything with
            ``encode(text, add_special_tokens=False) -> list[int]``. Fast (Rust) tokenizers refuse
            concurrent use of one object when padding or truncation settings change
            (huggingface/tokenizers#537): the pipeline gives each worker thread its own processor.
        prompt: the user text, as the request gives it (before the chat template).
        limits: the limits in force.

    Returns:
        The number of tokens.

    Raises:
        InvalidInputError: the prompt holds an image/video placeholder token
            (:data:`RESERVED_PROMPT_TOKENS`).
        LimitExceededError: more than ``max_prompt_tokens`` tokens.
    """
    _check_prompt_chars(prompt, limits)
    for token in RESERVED_PROMPT_TOKENS:
        if token in prompt:
            raise InvalidInputError(
                f"the prompt contains {token}, which is reserved for images and videos; remove it "
                "(images go in ImageRequest.images; the raw format places each with <image>)"
            )
    count = len(tokenizer.encode(prompt, add_special_tokens=False)) if prompt else 0
    if count > limits.max_prompt_tokens:
        raise LimitExceededError(
            "max_prompt_tokens",
            f"prompt has {count} tokens; the limit is max_prompt_tokens={limits.max_prompt_tokens}",
        )
    return count


@dataclass(frozen=True)
class Estimate:
    """What a request will cost, from its images' headers (nothing decoded).

    ``pixels``: decoded pixels of all its images (width x height, summed). ``tokens``: an upper
    bound of its cost in tokens (patches, image tokens, and the prompt's UTF-8 bytes plus the chat
    template when the LM runs). ``least_tokens``: the cost without the prompt (a lower bound).
    """

    pixels: int
    tokens: int
    least_tokens: int


# Tokens the chat template adds around the images and the prompt (system turn, role markers),
# with room to spare: about 30 for the Qwen2.5-VL template.
TEMPLATE_TOKENS = 128


def estimate_request(extractor: Extractor, request: EncodedRequest, limits: Limits, plan: OutputPlan) -> Estimate:
    """The request's :class:`Estimate` from its headers, refusing it when even its least cost is over
    ``max_request_tokens`` (before any pixel is decoded).

    Raises:
        InvalidInputError: an image that does not open, or whose size the processor refuses, or a
            resize range outside the model's (LimitExceededError: over ``max_pixels`` or
            ``max_request_tokens``).
    """
    from qwen25vl_embed_server.core.admission.cost import image_patches, tokens_before_decoding
    from qwen25vl_embed_server.core.model.image_decoding import declared_size

    sizes = [declared_size(data, index, limits.max_pixels) for index, data in enumerate(request.images)]
    image_processor = extractor.loaded.processor.image_processor
    pixels = pixel_range(request, extractor.loaded.processor)
    try:
        patches = [image_patches(width, height, image_processor, pixels) for width, height in sizes]
    except (ValueError, ZeroDivisionError) as err:  # e.g. an aspect ratio beyond the processor's limit
        listed = ", ".join(f"{width}x{height}" for width, height in sizes)
        raise InvalidInputError(f"the processor rejected the image(s) ({listed}): {err}") from err
    least = tokens_before_decoding(patches, extractor.merge_unit, plan)
    _check_tokens(least, limits, "at least ")
    prompt = len(request.text.encode()) + TEMPLATE_TOKENS if plan.needs_lm else 0
    return Estimate(pixels=sum(width * height for width, height in sizes), tokens=least + prompt, least_tokens=least)


def check_cost(prepared: Prepared, limits: Limits) -> None:
    """Refuse a prepared request whose exact cost is over ``max_request_tokens``."""
    _check_tokens(prepared.cost, limits, "")


def _check_tokens(tokens: int, limits: Limits, qualifier: str) -> None:
    if tokens > limits.max_request_tokens:
        raise LimitExceededError(
            "max_request_tokens",
            f"request costs {qualifier}{tokens} tokens (vision patches + LM sequence); "
            f"the limit is max_request_tokens={limits.max_request_tokens}",
        )


def prepare_request(
    extractor: Extractor,
    request: EncodedRequest,
    limits: Limits,
    plan: OutputPlan | None = None,
    processor: Any = None,
    estimated: bool = False,
) -> Prepared:
    """Check, decode, prompt-check and preprocess one request: what the model needs.

    Args:
        extractor: the model's extractor (for the output plan and the processor).
        request: the request.
        limits: the limits in force.
        plan: the request's output plan, if already made (:meth:`Extractor.plan`).
        processor: a processor private to the calling thread (None: the model's own; use that
            from one thread at a time).
        estimated: the caller already ran :func:`estimate_request` on this request (the
            pipeline does, to take its budgets): its headers are not read again.

    Raises:
        InvalidInputError: anything wrong with the request (LimitExceededError for a limit,
            ``max_request_tokens`` included: checked on the headers, then exactly).
    """
    from qwen25vl_embed_server.core.model.image_decoding import decode_image

    check_request(request, limits)
    if plan is None:
        plan = extractor.plan_request(request)
    if not estimated:
        estimate_request(extractor, request, limits, plan)  # headers only: refuse before decoding
    processor = processor if processor is not None else extractor.loaded.processor
    pixels = pixel_range(request, processor)  # before decoding: a refused range costs nothing
    images = [decode_image(data, index, limits.max_pixels) for index, data in enumerate(request.images)]
    check_prompt_tokens(processor.tokenizer, request.text, limits)
    prepared = extractor.prepare(
        images,
        request.text,
        plan,
        request.settings,
        processor=processor,
        prompt_format=request.prompt_format,
        pixels=pixels,
        adapter=request.adapter,
        task=request.task,
    )
    check_cost(prepared, limits)
    return prepared


def pixel_range(request: EncodedRequest, processor: Any) -> tuple[int, int] | None:
    """The request's (min, max) resize range, or None when it asks for none (the model's own).

    The model's range (its processor's ``min_pixels`` / ``max_pixels``, what the server was
    started with) caps the request's: a larger image costs the server more than its operator chose.

    Raises:
        InvalidInputError: a bound outside the model's range, or min above max.
    """
    if request.min_pixels is None and request.max_pixels is None:
        return None
    size = processor.image_processor.size
    floor, cap = int(size["shortest_edge"]), int(size["longest_edge"])
    low = floor if request.min_pixels is None else request.min_pixels
    high = cap if request.max_pixels is None else request.max_pixels
    for name, value in (("min_pixels", request.min_pixels), ("max_pixels", request.max_pixels)):
        if value is not None and not floor <= value <= cap:
            raise InvalidInputError(f"{name}={value} is outside the server's range [{floor}, {cap}] pixels")
    if low > high:
        raise InvalidInputError(f"min_pixels={low} is above max_pixels={high}")
    return low, high


def _check_prompt_chars(prompt: str, limits: Limits) -> None:
    if len(prompt) > limits.max_prompt_chars:
        raise LimitExceededError(
            "max_prompt_tokens",
            f"prompt has {len(prompt)} characters; the limit is {limits.max_prompt_chars} "
            f"({PROMPT_CHARS_PER_TOKEN} per token of max_prompt_tokens={limits.max_prompt_tokens})",
        )
