"""Retrieval recipes: what a Qwen2.5-VL retrieval model needs around the network to compute as trained.

A recipe names the document template (raw text, :data:`IMAGE_PLACEHOLDER` where the image goes),
the query format (prefix + text + augmentation suffix), the padding side its reference uses, the
pooling (per-token multi-vector or one vector), whether a projection head runs, the
normalisation and the image-tokens-only option. The values are those of colpali-engine 0.3.18
(``ColQwen2_5_Processor`` / ``BiQwen2_5_Processor`` and the models' ``forward``).

Padding side: the references pad left; this server pads right. With the attention mask, both give
the same per-token states (checked in tests against the left-padded reference), so the recipe
records the reference's side for the record, not as a switch.

Torch-free: the CLI lists recipes without loading the model's libraries.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

IMAGE_PLACEHOLDER = "<image>"
"""Where an image goes in a raw-format prompt (each becomes the model's vision span)."""

VISION_SPAN = "<|vision_start|><|image_pad|><|vision_end|>"
"""What the chat template renders for one image; the processor expands <|image_pad|> to its tokens."""

MULTI_VECTOR = "multi_vector"
SINGLE_VECTOR = "single_vector"

# colpali-engine's class names, as a checkpoint records them: the model classes in config.json's
# architectures (and an adapter's config), the processor classes in its processor files.
_CLASSES = {
    "ColQwen2_5": "colqwen2.5",
    "BiQwen2_5": "biqwen2.5",
    "ColQwen2_5_Processor": "colqwen2.5",
    "BiQwen2_5_Processor": "biqwen2.5",
}


@dataclass(frozen=True)
class Recipe:
    """How one retrieval model embeds documents (images) and queries (text).

    Attributes:
        name: "colqwen2.5" or "biqwen2.5".
        document_template: the whole document text, :data:`IMAGE_PLACEHOLDER` marking the image.
        query_prefix / query_suffix: around the query text (the suffix: augmentation tokens).
        padding_side: the reference's ("left"); see the module docstring.
        pooling: "tokens" (one vector per token), "last" (final token) or "mean" (over tokens).
        head: a projection head (``custom_text_proj``) runs on the last hidden states.
        normalize: L2-normalise each output vector.
        image_tokens_only: documents keep only image-token vectors (the others are zeroed, as
            the reference's ``mask_non_image_embeddings`` does).
    """

    name: str
    document_template: str
    query_prefix: str
    query_suffix: str
    padding_side: str
    pooling: str
    head: bool
    normalize: bool = True
    image_tokens_only: bool = False

    @property
    def output(self) -> str:
        """The output name this recipe serves."""
        return MULTI_VECTOR if self.pooling == "tokens" else SINGLE_VECTOR

    def query_text(self, text: str) -> str:
        return f"{self.query_prefix}{text}{self.query_suffix}"


_DOCUMENT = f"<|im_start|>user\n{IMAGE_PLACEHOLDER}Describe the image.<|im_end|><|endoftext|>"
# colpali-engine's process_queries: query_prefix ("" for Qwen2.5) + text + 10 augmentation tokens.
_AUGMENTATION = "<|endoftext|>" * 10

RECIPES: dict[str, Recipe] = {
    "colqwen2.5": Recipe(
        name="colqwen2.5",
        document_template=_DOCUMENT,
        query_prefix="",
        query_suffix=_AUGMENTATION,
        padding_side="left",
        pooling="tokens",
        head=True,
    ),
    "biqwen2.5": Recipe(
        name="biqwen2.5",
        document_template=_DOCUMENT,
        query_prefix="",
        query_suffix=_AUGMENTATION,
        padding_side="left",
        pooling="last",
        head=False,
    ),
}

RECIPE_CHOICES = ("auto", "none", *RECIPES)
"""Values of ``--recipe``: auto detects from the checkpoint, none serves raw states."""


def get_recipe(name: str, pooling: str | None = None, image_tokens_only: bool = False) -> Recipe:
    """The recipe ``name``, with the optional overrides (``pooling`` "last" | "mean" for one-vector
    recipes; ``image_tokens_only`` for multi-vector ones). Raises ValueError for bad values."""
    try:
        recipe = RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; expected one of {', '.join(RECIPES)}") from None
    if pooling is not None:
        if recipe.pooling == "tokens" or pooling not in ("last", "mean"):
            raise ValueError(f"recipe {name}: pooling {pooling!r} is not available")
        recipe = replace(recipe, pooling=pooling)
    if image_tokens_only:
        if recipe.pooling != "tokens":
            raise ValueError(f"recipe {name}: image_tokens_only applies to multi-vector recipes only")
        recipe = replace(recipe, image_tokens_only=True)
    return recipe


def recipe_of_class(name: str) -> str | None:
    """The recipe of one of colpali-engine's model or processor classes (by name), or None."""
    return _CLASSES.get(name)
