"""Retrieval recipes: what a Qwen2.5-VL retrieval model needs around the network to compute as trained.

A recipe names the document template (raw text, :data:`IMAGE_PLACEHOLDER` where the image goes),
the query format (prefix + text + augmentation suffix), the padding side its reference uses, the
pooling (per-token multi-vector or one vector), whether a projection head runs, the
normalisation and the image-tokens-only option. ColQwen2.5's and BiQwen2.5's values are those of
colpali-engine 0.3.18 (``ColQwen2_5_Processor`` / ``BiQwen2_5_Processor`` and the models'
``forward``); jina-embeddings-v4's those of its published modeling code: task LoRAs chosen per
request (:attr:`Recipe.tasks`), text documents (passages) with their own prefix, a single vector
(the mean over the image's vision span, or over a text's tokens) with Matryoshka sizes, and a
multi-vector from its projector.

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

JINA_TASKS = ("retrieval", "text-matching", "code")
"""jina-embeddings-v4's tasks, as its config's ``task_names`` lists them (retrieval the default)."""

MULTI_VECTOR = "multi_vector"
SINGLE_VECTOR = "single_vector"

# colpali-engine's class names, as a checkpoint records them: the model classes in config.json's
# architectures (and an adapter's config), the processor classes in its processor files.
_CLASSES = {
    "ColQwen2_5": "colqwen2.5",
    "BiQwen2_5": "biqwen2.5",
    "ColQwen2_5_Processor": "colqwen2.5",
    "BiQwen2_5_Processor": "biqwen2.5",
    "JinaEmbeddingsV4Model": "jina-v4",
}


@dataclass(frozen=True)
class Recipe:
    """How one retrieval model embeds documents (images) and queries (text).

    Attributes:
        name: "colqwen2.5" or "biqwen2.5".
        document_template: the whole document text, :data:`IMAGE_PLACEHOLDER` marking the image.
        query_prefix / query_suffix: around the query text (the suffix: augmentation tokens).
        padding_side: the reference's ("left"); see the module docstring.
        pooling: "tokens" (one vector per token), "last" (final token), "mean" (over tokens) or
            "span_mean" (over an image's vision span, start and end tokens included, or over a
            text's tokens).
        head: a projection head runs on the last hidden states (ColQwen2.5's ``custom_text_proj``
            for its multi-vector; jina-embeddings-v4's ``multi_vector_projector`` for its
            multi-vector, beside the single vector).
        normalize: L2-normalise each output vector.
        image_tokens_only: documents keep only image-token vectors (the others are zeroed, as
            the reference's ``mask_non_image_embeddings`` does).
        tasks: the task adapters a request chooses from (jina-embeddings-v4: "retrieval",
            "text-matching", "code"; the first is the default); empty: none.
        matryoshka_dims: the single vector's sizes a request may ask for (``dimensions``); empty:
            any size up to the full one.
        passage_prefix: before a text document's text (empty: the recipe has no text documents).
        query_only_tasks: tasks whose every text, passage or query, takes the query prefix.
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
    tasks: tuple[str, ...] = ()
    matryoshka_dims: tuple[int, ...] = ()
    passage_prefix: str = ""
    query_only_tasks: tuple[str, ...] = ()

    @property
    def output(self) -> str:
        """The output name this recipe serves by default."""
        return MULTI_VECTOR if self.pooling == "tokens" else SINGLE_VECTOR

    @property
    def outputs(self) -> tuple[str, ...]:
        """Every output this recipe serves, the default first: a one-vector recipe with a head
        (jina-embeddings-v4's projector) also serves multi-vectors."""
        if self.output == SINGLE_VECTOR and self.head:
            return (SINGLE_VECTOR, MULTI_VECTOR)
        return (self.output,)

    @property
    def default_task(self) -> str:
        """The task of a request that names none ("" for a recipe without tasks)."""
        return self.tasks[0] if self.tasks else ""

    def query_text(self, text: str) -> str:
        return f"{self.query_prefix}{text}{self.query_suffix}"

    def passage_text(self, text: str, task: str = "") -> str:
        """A text document's whole input text (``task``: one of :attr:`tasks`)."""
        if task in self.query_only_tasks:
            return self.query_text(text)
        return f"{self.passage_prefix}{text}"

    def with_tasks(self, tasks: tuple[str, ...], matryoshka_dims: tuple[int, ...]) -> Recipe:
        """This recipe with a checkpoint's own task list and Matryoshka sizes (its config's)."""
        return replace(self, tasks=tasks, matryoshka_dims=matryoshka_dims)


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
    # jina-embeddings-v4: the image prompt has no system turn and ends with a newline; texts are
    # prefixed, without a chat template. Its tasks and Matryoshka sizes come from the checkpoint's
    # config (task_names, matryoshka_dims; these are the published ones).
    "jina-v4": Recipe(
        name="jina-v4",
        document_template=f"<|im_start|>user\n{IMAGE_PLACEHOLDER}Describe the image.<|im_end|>\n",
        query_prefix="Query: ",
        query_suffix="",
        padding_side="right",
        pooling="span_mean",
        head=True,
        tasks=JINA_TASKS,
        matryoshka_dims=(128, 256, 512, 1024, 2048),
        passage_prefix="Passage: ",
        query_only_tasks=("text-matching",),
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
        if recipe.pooling not in ("last", "mean") or pooling not in ("last", "mean"):
            raise ValueError(f"recipe {name}: pooling {pooling!r} is not available")
        recipe = replace(recipe, pooling=pooling)
    if image_tokens_only:
        if MULTI_VECTOR not in recipe.outputs or recipe.tasks:
            raise ValueError(f"recipe {name}: image_tokens_only applies to multi-vector recipes only")
        recipe = replace(recipe, image_tokens_only=True)
    return recipe


def recipe_of_class(name: str) -> str | None:
    """The recipe of one of colpali-engine's model or processor classes (by name), or None."""
    return _CLASSES.get(name)
