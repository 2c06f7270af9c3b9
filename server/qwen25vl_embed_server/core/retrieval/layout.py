"""Where a retrieval checkpoint's parts are, and which recipe the checkpoint says it has.

Layouts accepted at a local path:

- an adapter folder (``adapter_config.json``; ``base_model_name_or_path`` names the base): the
  processor comes from the adapter folder when it carries processor files (as the published
  adapters and colpali-engine's trainer write them), else from the base;
- merged weights: a checkpoint whose ``config.json`` names ``ColQwen2_5`` / ``BiQwen2_5``.

The recipe is read from everything the folder says (:func:`detect_recipe`), strongest first:

1. the adapter's config naming colpali-engine's model class (peft records it as
   ``auto_mapping.base_model_class`` for a class outside transformers);
2. the folder's own processor files naming colpali-engine's processor class (``processor_class``:
   ``ColQwen2_5_Processor`` / ``BiQwen2_5_Processor``);
3. an adapter's weights: LoRA on ColQwen2.5's head (``custom_text_proj``) or none, as BiQwen2.5
   has no head (colpali-engine trains the head with the adapter);
4. the base's (or merged checkpoint's) ``config.json`` architectures, then the base's processor
   files.

The first statement decides. Statements 1-3 are the folder's own and must agree; the base may
say otherwise: colpali-engine trains BiQwen2.5 from the ColQwen2.5 base, whose config names
``ColQwen2_5``.

Torch-free: JSON files and safetensors headers only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from qwen25vl_embed_server.core.retrieval.recipes import recipe_of_class

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
"""A folder with one of these carries its own processor (``tokenizer_config.json`` comes with it)."""

HEAD_MODULE = "custom_text_proj"
"""ColQwen2.5's projection head, by its module name."""


@dataclass(frozen=True)
class RetrievalLayout:
    """Where a retrieval checkpoint's parts are: ``base`` weights, optional ``adapter``, processor."""

    base: str
    adapter: str | None
    processor: str


@dataclass(frozen=True)
class Statement:
    """What one part of a checkpoint says about its recipe: ``recipe`` and where it says so
    (``source``, a few words). ``own``: the folder's own statement (1-3 in the module docstring)."""

    recipe: str
    source: str
    own: bool


def find_layout(path: str) -> RetrievalLayout | None:
    """The retrieval layout at a local ``path``, or None when it is a plain checkpoint."""
    folder = Path(path)
    adapter_config = _json(folder / "adapter_config.json")
    if adapter_config is not None:
        base = str(adapter_config["base_model_name_or_path"])
        processor = path if carries_processor(path) else base
        return RetrievalLayout(base=base, adapter=path, processor=processor)
    if any(recipe_of_class(name) for name in _architectures(path)):
        return RetrievalLayout(base=path, adapter=None, processor=path)
    return None


def carries_processor(path: str) -> bool:
    return any((Path(path) / name).exists() for name in PROCESSOR_FILES)


def statements(layout: RetrievalLayout) -> list[Statement]:
    """What the checkpoint says about its recipe, strongest first (see the module docstring)."""
    found: list[Statement] = []
    own = layout.adapter if layout.adapter is not None else layout.base
    if layout.adapter is not None:
        adapter_config = _json(Path(layout.adapter) / "adapter_config.json") or {}
        named = str((adapter_config.get("auto_mapping") or {}).get("base_model_class") or "")
        if (recipe := recipe_of_class(named)) is not None:
            found.append(Statement(recipe, f"the adapter's config names {named}", own=True))
    if carries_processor(own) and (processor := processor_class(own)) and (recipe := recipe_of_class(processor)):
        found.append(Statement(recipe, f"its processor files name {processor}", own=True))
    if layout.adapter is not None and (keys := adapter_keys(layout.adapter)) is not None:
        if any(f".{HEAD_MODULE}." in key for key in keys):
            found.append(Statement("colqwen2.5", f"the adapter's weights train {HEAD_MODULE}", own=True))
        else:
            found.append(Statement("biqwen2.5", f"the adapter's weights have no {HEAD_MODULE}", own=True))
    for named in _architectures(layout.base):
        if (recipe := recipe_of_class(named)) is not None:
            where = "the base's" if layout.adapter is not None else "its"
            found.append(Statement(recipe, f"{where} config.json names {named}", own=False))
    base_processor = processor_class(layout.processor) if layout.processor != own else None
    if base_processor and (recipe := recipe_of_class(base_processor)):
        found.append(Statement(recipe, f"the base's processor files name {base_processor}", own=False))
    return found


def detect_recipe(layout: RetrievalLayout) -> tuple[str | None, str]:
    """``(recipe, reason)``: the recipe the checkpoint says it has (None when it names none).

    Raises:
        ValueError: the folder's own statements disagree (one line naming them).
    """
    said = statements(layout)
    own = [statement for statement in said if statement.own]
    if len({statement.recipe for statement in own}) > 1:
        claims = "; ".join(f"{statement.source} ({statement.recipe})" for statement in own)
        raise ValueError(f"the checkpoint names more than one recipe: {claims}; choose one with --recipe")
    if not said:
        return None, "the checkpoint names no ColQwen2.5 / BiQwen2.5 class"
    return said[0].recipe, said[0].source


def processor_class(folder: str) -> str | None:
    """The ``processor_class`` a folder's processor (or tokenizer) files record, if any."""
    for name in (*PROCESSOR_FILES, "tokenizer_config.json"):
        named = (_json(Path(folder) / name) or {}).get("processor_class")
        if named:
            return str(named)
    return None


def adapter_keys(folder: str) -> list[str] | None:
    """The tensor names in an adapter folder's ``adapter_model.safetensors`` (None without one)."""
    weights = Path(folder) / "adapter_model.safetensors"
    if not weights.exists():
        return None
    with safe_open(str(weights), framework="numpy") as opened:
        return list(opened.keys())


def _architectures(path: str) -> tuple[str, ...]:
    return tuple((_json(Path(path) / "config.json") or {}).get("architectures") or ())


def _json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded
