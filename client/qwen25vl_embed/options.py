"""One request's settings as one typed value: :class:`ExtractOptions`.

Every request method of both clients (``extract``, ``extract_many``, ``embed_queries``,
``embed_images``) takes ``options=`` and the same settings as keyword arguments; a keyword
argument given (not None) overrides the field of ``options``. Nothing is checked here:
:func:`~qwen25vl_embed.requests.request_from_options` validates when it builds a request, so
``extract_many`` reports a bad setting in the place of each request, as it does a bad image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qwen25vl_embed.choices import PromptFormat, VectorEncoding

__all__ = ["ExtractOptions"]


@dataclass(frozen=True, kw_only=True)
class ExtractOptions:
    """The settings of a request (or of each request of a stream).

    Attributes:
        prompt: the user text after the images; None lets the server use its default
            ("Describe the image."), "" sends no text.
        outputs: output names (see ``ServerInfo.outputs``); empty asks for the pooled vectors and
            visual_token_lens (the retrieval vectors with a query or document format).
        dtype: wire dtype of floating outputs: "float32", "float16" or "bfloat16" (arrays of
            ``ml_dtypes.bfloat16``).
        normalize: L2-normalise the pooled vectors.
        prompt_format: a :class:`~qwen25vl_embed.PromptFormat` or its name: "chat" (the chat
            template), "raw" (the prompt is the whole text, "<image>" where each image goes),
            "query" / "document" (the server's retrieval recipe; see ``ServerInfo.recipe``).
        dimensions: Matryoshka size of the retrieval outputs (0: all).
        vector_encoding: their wire form, a :class:`~qwen25vl_embed.VectorEncoding` or its name:
            "float" (``dtype``), "int8" or "binary".
        min_pixels / max_pixels: resize range of the images (width x height), within the
            server's (``ServerInfo.min_pixels`` / ``max_pixels``); None: the server's.
        timeout: deadline of the call (of the whole stream for the streaming methods), in
            seconds; None: the client's default.
        adapter: the retrieval adapter to run with, by name (``ServerInfo.adapters``); "": the
            server's own model (its recipe, or the base's raw outputs on a server of adapters).
        task: the recipe's task, for a recipe with tasks (``ServerInfo.recipe.tasks``; jina-v4:
            "retrieval", "text-matching", "code"); "": its default task.
    """

    prompt: str | None = None
    outputs: Sequence[str] = ()
    dtype: str = "float32"
    normalize: bool = False
    prompt_format: PromptFormat | str = PromptFormat.CHAT
    dimensions: int = 0
    vector_encoding: VectorEncoding | str = VectorEncoding.FLOAT
    min_pixels: int | None = None
    max_pixels: int | None = None
    timeout: float | None = None
    adapter: str = ""
    task: str = ""

    def replace(self, **changes: Any) -> ExtractOptions:
        """A copy with the ``changes`` that are not None (a keyword argument left unset is None)."""
        given = {name: value for name, value in changes.items() if value is not None}
        return dataclasses.replace(self, **given) if given else self


def merge(options: ExtractOptions | None, **changes: Any) -> ExtractOptions:
    """``options`` (default: :class:`ExtractOptions`'s defaults) with the keyword arguments given."""
    return (options if options is not None else ExtractOptions()).replace(**changes)
