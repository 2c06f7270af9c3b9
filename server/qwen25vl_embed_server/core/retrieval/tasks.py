"""A request's task and Matryoshka size, checked against the recipe in force (torch-free).

A recipe with tasks (jina-embeddings-v4) serves the tasks its checkpoint lists; a request names
one (none: the recipe's default, its first) and may ask for the single vector's Matryoshka sizes
only. A recipe without tasks takes no task.
"""

from __future__ import annotations

from qwen25vl_embed_server.core.errors import InvalidInputError, quoted
from qwen25vl_embed_server.core.retrieval.recipes import JINA_TASKS, MULTI_VECTOR, Recipe


def resolve_task(recipe: Recipe | None, task: str) -> str:
    """The task a request runs with: ``task``, or the recipe's default when it names none ("" for
    a recipe without tasks).

    Raises:
        InvalidInputError: a task on a model without tasks, an unknown task, or a known task this
            checkpoint lacks (naming those it has).
    """
    tasks = recipe.tasks if recipe is not None else ()
    if not task:
        return tasks[0] if tasks else ""
    if not tasks:
        what = f"its recipe {recipe.name} has none" if recipe is not None else "it serves no retrieval recipe"
        raise InvalidInputError(f"task {quoted(task)} is not available: {what}")
    if task not in tasks:
        if task in JINA_TASKS:
            raise InvalidInputError(f"this model lacks task {task!r}; its tasks: {', '.join(tasks)}")
        raise InvalidInputError(f"unknown task {quoted(task)}; expected one of {', '.join(tasks)}")
    return task


def check_dimensions(recipe: Recipe | None, dimensions: int, outputs: tuple[str, ...]) -> None:
    """Refuse a Matryoshka size the recipe does not list (a recipe with a list), or any size asked
    beside its multi-vector (which has none). Raises :class:`InvalidInputError`."""
    if recipe is None or not recipe.matryoshka_dims or not dimensions:
        return
    if dimensions not in recipe.matryoshka_dims:
        listed = ", ".join(str(size) for size in recipe.matryoshka_dims)
        raise InvalidInputError(f"dimensions={dimensions} is not one of {recipe.name}'s Matryoshka sizes: {listed}")
    if MULTI_VECTOR in outputs:
        raise InvalidInputError(
            f"dimensions applies to {recipe.name}'s single_vector only; its multi_vector has no Matryoshka sizes"
        )
