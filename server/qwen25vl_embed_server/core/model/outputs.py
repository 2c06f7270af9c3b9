"""Output names and what each needs the model to run."""

from __future__ import annotations

import re
from dataclasses import dataclass

from qwen25vl_embed_server.core.errors import InvalidInputError, quoted
from qwen25vl_embed_server.core.retrieval.recipes import MULTI_VECTOR, SINGLE_VECTOR

VISION_TOKENS = "vision_tokens"
PROJECTED_TOKENS = "projected_tokens"
LM_LAST_HIDDEN = "lm_last_hidden"
LM_IMAGE_TOKENS = "lm_image_tokens"
VISION_POOLED_MEAN = "vision_pooled_mean"
PROJECTED_POOLED_MEAN = "projected_pooled_mean"
LM_POOLED_MEAN = "lm_pooled_mean"
LM_IMAGE_POOLED_MEAN = "lm_image_pooled_mean"
LM_LAST_TOKEN = "lm_last_token"
VISUAL_TOKEN_LENS = "visual_token_lens"
IMAGE_GRID_THW = "image_grid_thw"

POOLED = (VISION_POOLED_MEAN, PROJECTED_POOLED_MEAN, LM_POOLED_MEAN, LM_IMAGE_POOLED_MEAN, LM_LAST_TOKEN)
# What the original script saved by default: the pooled vectors and the per-image token counts.
DEFAULT_OUTPUTS = (*POOLED, VISUAL_TOKEN_LENS)
# Token tensors, as saved by the original script's --save-tokens.
TOKEN_OUTPUTS = (VISION_TOKENS, PROJECTED_TOKENS, LM_LAST_HIDDEN, LM_IMAGE_TOKENS)
FIXED_OUTPUTS = (*TOKEN_OUTPUTS, *POOLED, VISUAL_TOKEN_LENS, IMAGE_GRID_THW)
# A request without images (a text query) has only the language model's outputs.
TEXT_DEFAULT_OUTPUTS = (LM_POOLED_MEAN, LM_LAST_TOKEN)
_TEXT_OUTPUTS = frozenset({LM_LAST_HIDDEN, LM_POOLED_MEAN, LM_LAST_TOKEN, MULTI_VECTOR, SINGLE_VECTOR})
# Served only by a model with a retrieval recipe (one of them, as the recipe says).
RETRIEVAL_OUTPUTS = (MULTI_VECTOR, SINGLE_VECTOR)

_NEEDS_LM = frozenset(
    {LM_LAST_HIDDEN, LM_IMAGE_TOKENS, LM_POOLED_MEAN, LM_IMAGE_POOLED_MEAN, LM_LAST_TOKEN, *RETRIEVAL_OUTPUTS}
)
_LAYER = re.compile(r"^(lm|vision)_layer_(-?[0-9]{1,9})$")  # bounded: int() of 5,000 digits raises


@dataclass(frozen=True)
class OutputPlan:
    """The validated outputs of one request and the model work they need.

    ``lm_layers`` / ``vision_layers`` map each requested layer index (as resolved, 0-based) to
    the names the caller used for it (``lm_layer_-1`` and ``lm_layer_3`` may name one layer).
    """

    names: tuple[str, ...]
    lm_layers: dict[int, tuple[str, ...]]
    vision_layers: dict[int, tuple[str, ...]]

    @property
    def needs_lm(self) -> bool:
        """True when the language model must run (any LM output or LM layer)."""
        return bool(self.lm_layers) or any(name in _NEEDS_LM for name in self.names)

    @property
    def needs_vision_tokens(self) -> bool:
        return VISION_TOKENS in self.names or VISION_POOLED_MEAN in self.names


def available_outputs(
    num_lm_layers: int, num_vision_layers: int, retrieval: str | tuple[str, ...] | None = None
) -> tuple[str, ...]:
    """Every output name a model of this depth can produce (``retrieval``: its recipe's output or
    outputs)."""
    layers = [f"lm_layer_{k}" for k in range(num_lm_layers)]
    layers += [f"vision_layer_{k}" for k in range(num_vision_layers)]
    return (*FIXED_OUTPUTS, *_served(retrieval), *layers)


def _served(retrieval: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return (retrieval,) if isinstance(retrieval, str) else tuple(retrieval or ())


def plan_outputs(
    requested: list[str] | tuple[str, ...],
    num_lm_layers: int,
    num_vision_layers: int,
    has_images: bool = True,
    retrieval: str | tuple[str, ...] | None = None,
) -> OutputPlan:
    """Validate ``requested`` into an :class:`OutputPlan`. Empty: :data:`DEFAULT_OUTPUTS`, or
    :data:`TEXT_DEFAULT_OUTPUTS` without images, or the recipe's ``retrieval`` output when set
    (the first, when the recipe serves several).

    Raises :class:`InvalidInputError` naming any unknown output, out-of-range layer, a retrieval
    output the model does not serve, or (``has_images`` false) every output that needs an image.
    """
    served = _served(retrieval)
    if requested:
        names = tuple(dict.fromkeys(requested))
    elif served:
        names = served[:1]
    else:
        names = DEFAULT_OUTPUTS if has_images else TEXT_DEFAULT_OUTPUTS
    if not has_images:
        visual = [name for name in names if name not in _TEXT_OUTPUTS and not name.startswith("lm_layer_")]
        if visual:
            raise InvalidInputError(
                f"the request has no image, so it has no {', '.join(visual)}; a text request may ask for "
                f"{', '.join(sorted(_TEXT_OUTPUTS))} or lm_layer_<k>"
            )
    lm_layers: dict[int, list[str]] = {}
    vision_layers: dict[int, list[str]] = {}
    for name in names:
        if name in FIXED_OUTPUTS or name in served:
            continue
        if name in RETRIEVAL_OUTPUTS:
            says = f"this model serves {', '.join(served)}" if served else "this model has no retrieval recipe"
            says += "" if served else " (--recipe)"
            raise InvalidInputError(f"output {name!r} is not available: {says}")
        match = _LAYER.match(name)
        if match is None:
            raise InvalidInputError(
                f"unknown output {quoted(name)}; expected one of {', '.join(FIXED_OUTPUTS)}, "
                "lm_layer_<k> or vision_layer_<k>"
            )
        kind, k = match.group(1), int(match.group(2))
        depth = num_lm_layers if kind == "lm" else num_vision_layers
        if not -depth <= k < depth:
            raise InvalidInputError(f"output {quoted(name)}: layer {k} out of range for {depth} {kind} layers")
        target = lm_layers if kind == "lm" else vision_layers
        target.setdefault(k % depth, []).append(name)
    return OutputPlan(
        names=names,
        lm_layers={k: tuple(v) for k, v in lm_layers.items()},
        vision_layers={k: tuple(v) for k, v in vision_layers.items()},
    )


def check_output_names(requested: list[str] | tuple[str, ...]) -> None:
    """Refuse names that no model has (before one is loaded); layer indices are checked only
    against a model's depth, and the retrieval outputs against its recipe, by :func:`plan_outputs`.
    Raises :class:`InvalidInputError`."""
    for name in requested:
        if name not in (*FIXED_OUTPUTS, *RETRIEVAL_OUTPUTS) and _LAYER.match(name) is None:
            plan_outputs([name], 0, 0)  # raises the same message as a model would


def merge_plans(plans: list[OutputPlan]) -> OutputPlan:
    """One plan that captures everything any of ``plans`` needs (for a batch)."""
    lm_layers: dict[int, tuple[str, ...]] = {}
    vision_layers: dict[int, tuple[str, ...]] = {}
    for plan in plans:
        for k, aliases in plan.lm_layers.items():
            lm_layers[k] = tuple(dict.fromkeys((*lm_layers.get(k, ()), *aliases)))
        for k, aliases in plan.vision_layers.items():
            vision_layers[k] = tuple(dict.fromkeys((*vision_layers.get(k, ()), *aliases)))
    names = tuple(dict.fromkeys(name for plan in plans for name in plan.names))
    return OutputPlan(names=names, lm_layers=lm_layers, vision_layers=vision_layers)
