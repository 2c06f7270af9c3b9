"""Which adapter, task and text role one HTTP request asks for, as the peers' clients name them.

- ``adapter``: a retrieval adapter served beside the base (``serve --adapter NAME=PATH``), by
  name; or ``model`` naming one, as OpenAI-compatible servers pick a LoRA adapter (vLLM lists
  its adapters in ``GET /v1/models`` and takes their names as ``model``).
- ``task``: the recipe's task (jina-embeddings-v4), in the names of jina's own API
  (``retrieval.query``, ``retrieval.passage``, ``text-matching``, ``code.query``,
  ``code.passage``) or the checkpoint's (``retrieval``, ``text-matching``, ``code``). The
  ``.query`` / ``.passage`` suffix says how texts are embedded: as queries, or as text documents
  (the recipe's passage format); images are documents whatever the suffix.

The names travel to the core request as they are: the core refuses an unknown adapter or task
(400), naming those the server has, exactly as the gRPC edge answers INVALID_ARGUMENT.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen25vl_embed_server.core.errors import InvalidInputError, quoted
from qwen25vl_embed_server.core.model.model_info import ModelInfo, RecipeInfo
from qwen25vl_embed_server.http.errors import HTTPError

ROLES = ("query", "passage")
"""The suffixes of jina's task names: how a text is embedded."""


@dataclass(frozen=True)
class Selection:
    """One request's choice. ``recipe``: the one in force (the adapter's, or the model's; None:
    raw states, or an adapter this server does not serve, which the core then refuses).
    ``role``: "query", "passage", or None (the route's default: a text is a query)."""

    recipe: RecipeInfo | None
    adapter: str = ""
    task: str = ""
    role: str | None = None

    @property
    def passage(self) -> bool:
        return self.role == "passage"


def select(info: ModelInfo, served: str, model: str | None, adapter: str | None, task: str | None) -> Selection:
    """The selection of a request's ``model``, ``adapter`` and ``task`` fields.

    Raises:
        HTTPError: 404, a ``model`` that is neither the served model nor one of its adapters.
        InvalidInputError: ``model`` and ``adapter`` naming different adapters.
    """
    chosen = adapter or ""
    if model and model not in (served, info.model):
        if model not in {one.name for one in info.adapters}:
            names = ", ".join(repr(name) for name in (served, *(a.name for a in info.adapters)))
            raise HTTPError(404, f"model {quoted(model)} is not served here; GET /v1/models lists {names}")
        if chosen and chosen != model:
            raise InvalidInputError(
                f"model {quoted(model)} and adapter {quoted(chosen)} name different adapters; give one of them"
            )
        chosen = model
    name, role = split_task(task or "")
    recipe = info.recipe
    if chosen:
        recipe = next((one.recipe for one in info.adapters if one.name == chosen), None)
    return Selection(recipe=recipe, adapter=chosen, task=name, role=role)


def split_task(task: str) -> tuple[str, str | None]:
    """``(task, role)`` of a task name: ``retrieval.passage`` -> ("retrieval", "passage");
    a name without a role suffix is the task itself (``text-matching`` -> ("text-matching", None))."""
    name, dot, suffix = task.rpartition(".")
    if dot and name and suffix in ROLES:
        return name, suffix
    return task, None
