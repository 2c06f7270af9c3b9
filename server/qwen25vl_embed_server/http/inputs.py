"""The peers' inputs -> the core's :class:`EncodedRequest`: data URLs, chat-style messages, texts,
and the prompt format each takes on the model in service.

One input (a text, an image, one ``messages`` prompt) is one embedding and one request of the
pipeline. On a checkpoint with a retrieval recipe (or with a retrieval adapter named) a text is a
query (the recipe's query format), or a passage when the request's task says so, and an image a
document (its document format); on a raw checkpoint a text from ``input`` is sent
as written (the raw format, as vLLM tokenizes ``input``), and a ``messages`` prompt or an image
goes through the chat template (images first, then the text; "Describe the image." when none).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass

from qwen25vl_embed_server.core.admission.request import EncodedRequest
from qwen25vl_embed_server.core.errors import InvalidInputError, quoted
from qwen25vl_embed_server.core.model.output_settings import OutputSettings
from qwen25vl_embed_server.http.schemas import ImagePart, Message
from qwen25vl_embed_server.http.selection import Selection


@dataclass(frozen=True)
class Item:
    """One embedding to compute. ``chat``: on a raw checkpoint, the text goes through the chat
    template (a ``messages`` prompt or an image) rather than as written (an ``input`` text)."""

    images: tuple[bytes, ...] = ()
    text: str | None = None
    chat: bool = False


def data_url_bytes(url: str, what: str) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` URL. Raises InvalidInputError naming ``what``."""
    if not url.startswith("data:"):
        raise InvalidInputError(
            f"{what} is not a data URL ({quoted(url, 40)}); the server fetches nothing: send "
            "data:image/<format>;base64,<bytes>"
        )
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise InvalidInputError(f"{what} is not a base64 data URL: expected data:image/<format>;base64,<bytes>")
    media = header.removeprefix("data:").split(";")[0]
    if media and not media.startswith("image/"):
        raise InvalidInputError(f"{what} has media type {quoted(media)}; expected an image/* type")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidInputError(f"{what} is not valid base64: {err}") from None
    if not data:
        raise InvalidInputError(f"{what} holds no bytes")
    return data


def text_items(texts: Sequence[str]) -> list[Item]:
    return [Item(text=text) for text in texts]


def image_items(urls: Sequence[str]) -> list[Item]:
    return [Item(images=(data_url_bytes(url, f"images[{index}]"),), chat=True) for index, url in enumerate(urls)]


def message_item(messages: Sequence[Message]) -> Item:
    """The one prompt of vLLM's chat-style embedding request: a single user message whose content
    is its images (``image_url`` parts with data URLs) followed by its text parts (joined as the
    chat template joins them, with nothing between). Other shapes are refused (400)."""
    if len(messages) != 1 or messages[0].role != "user":
        roles = ", ".join(message.role for message in messages)
        raise InvalidInputError(
            f"messages must be one user message (got {len(messages)}: {roles}); the chat template adds the "
            "model's own system turn"
        )
    content = messages[0].content
    if isinstance(content, str):
        return Item(text=content, chat=True)
    images: list[bytes] = []
    texts: list[str] = []
    for index, part in enumerate(content):
        if isinstance(part, ImagePart):
            if texts:
                raise InvalidInputError(
                    f"messages[0].content[{index}] is an image after text; put the images first "
                    "(the prompt is the images, then the text)"
                )
            images.append(data_url_bytes(part.image_url.url, f"messages[0].content[{index}].image_url.url"))
        else:
            texts.append(part.text)
    if not images and not texts:
        raise InvalidInputError("messages[0].content is empty; give images, text or both")
    return Item(images=tuple(images), text="".join(texts) if texts else None, chat=True)


def encoded(
    item: Item, selection: Selection, output: str, settings: OutputSettings, request_id: str, where: str
) -> EncodedRequest:
    """The core's request for ``item`` with ``selection`` (its recipe, adapter, task and text
    role), asking for ``output``. A text is a query, or with the passage role a text document
    (the recipe's passage format); an image is a document.

    Raises InvalidInputError: text beside images on a retrieval checkpoint (its document format
    is the recipe's own text).
    """
    recipe = selection.recipe
    if recipe is not None:
        if item.images and item.text is not None:
            raise InvalidInputError(
                f"{where}: a retrieval checkpoint ({recipe.name}) embeds images as documents with its "
                "recipe's own text; send images without text, or text alone (a query)"
            )
        if item.images:
            prompt_format, prompt = "document", None
        else:
            prompt_format, prompt = ("document" if selection.passage else "query"), item.text
    elif item.chat:
        prompt_format, prompt = "chat", item.text
    else:
        prompt_format, prompt = "raw", item.text
    return EncodedRequest(
        images=item.images,
        prompt=prompt,
        outputs=(output,),
        settings=settings,
        request_id=request_id,
        prompt_format=prompt_format,
        adapter=selection.adapter,
        task=selection.task,
    )
