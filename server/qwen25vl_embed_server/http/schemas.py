"""The request bodies, as the peers define them (pydantic: FastAPI checks them before a route runs).

Unknown fields are refused (400 naming the field), so a misspelt option never passes unnoticed;
``user`` (OpenAI's end-user tag) is accepted and ignored. Beyond the peers' fields, each body
takes ``task`` and ``adapter`` (:mod:`~.selection`): OpenAI's client sends them with ``extra_body``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

NonEmpty = Annotated[str, StringConstraints(min_length=1)]

TASK = (
    "the recipe's task (jina-embeddings-v4), as jina's API names it: retrieval.query, retrieval.passage, "
    "text-matching, code.query, code.passage (or retrieval, code: texts as queries); none: the default task"
)
ADAPTER = "a retrieval adapter served beside the base, by name (GET /v1/models lists them; model may name it too)"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str = Field(description="a data URL: data:image/<format>;base64,<bytes> (the server fetches nothing)")
    detail: str | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class TextPart(_Strict):
    type: Literal["text"]
    text: str


Part = Annotated[ImagePart | TextPart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]


class EmbeddingsRequest(_Strict):
    """``POST /v1/embeddings`` (and ``POST /pooling``): ``input`` texts, or one chat-style
    ``messages`` prompt with images (vLLM's multimodal shape); exactly one of them."""

    model: str | None = None
    input: NonEmpty | list[NonEmpty] | None = None
    messages: list[Message] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(gt=0)] | None = None
    user: str | None = None
    task: NonEmpty | None = Field(default=None, description=TASK)
    adapter: NonEmpty | None = Field(default=None, description=ADAPTER)

    @model_validator(mode="after")
    def _one_input(self) -> EmbeddingsRequest:
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of input (texts) and messages (a chat-style prompt with images)")
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input is an empty list; give at least one text")
        if self.messages is not None and not self.messages:
            raise ValueError("messages is empty; give one user message")
        return self

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input or ())


InputType = Literal["search_query", "search_document", "classification", "clustering", "image"]
EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]


class CohereEmbedRequest(_Strict):
    """``POST /v2/embed`` (Cohere v2): ``texts`` or ``images`` (data URIs), exactly one of them."""

    model: str | None = None
    texts: list[NonEmpty] | None = None
    images: list[str] | None = None
    input_type: InputType | None = None
    embedding_types: list[EmbeddingType] = Field(default_factory=lambda: ["float"])  # type: ignore[arg-type]
    output_dimension: Annotated[int, Field(gt=0)] | None = None
    truncate: Literal["NONE", "START", "END"] | None = None
    task: NonEmpty | None = Field(default=None, description=TASK)
    adapter: NonEmpty | None = Field(default=None, description=ADAPTER)

    @model_validator(mode="after")
    def _one_input(self) -> CohereEmbedRequest:
        if (self.texts is None) == (self.images is None):
            raise ValueError("give exactly one of texts and images")
        if not (self.texts or self.images):
            raise ValueError("texts or images is an empty list; give at least one")
        if not self.embedding_types:
            raise ValueError("embedding_types is empty; give at least one of float, int8, uint8, binary, ubinary")
        if self.truncate not in (None, "NONE"):
            raise ValueError(
                f"truncate={self.truncate} is not supported: a text over the server's max_prompt_tokens is "
                "refused (413), never cut; send truncate NONE or leave it out"
            )
        return self
