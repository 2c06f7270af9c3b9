"""Load a Qwen2.5-VL retrieval model as published: base + PEFT LoRA adapter (merged at load) + head.

Layouts accepted at a local path (or hub id):

- an adapter folder (``adapter_config.json``; ``base_model_name_or_path`` names the base): the
  base is loaded, the adapter (LoRA on the language model and, for ColQwen2.5, on the head) is
  merged into it with peft, and the processor comes from the adapter folder when it carries one
  (as the published adapters do), else from the base;
- merged weights: a checkpoint whose ``config.json`` names ``ColQwen2_5`` / ``BiQwen2_5``.

The module names are those of colpali-engine's ``ColQwen2_5`` (a ``Qwen2_5_VLModel`` with a
``custom_text_proj`` beside ``visual`` and ``language_model``), so its weights and adapters load
without renaming.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLModel

from qwen25vl_embed_server.core.recipes import Recipe

log = logging.getLogger(__name__)

HEAD_DIM = 128
"""ColQwen2.5's custom_text_proj output size (fixed in the reference)."""


class HeadedQwen2_5_VLModel(Qwen2_5_VLModel):  # noqa: N801 - the transformers class name it extends
    """``Qwen2_5_VLModel`` plus ``custom_text_proj`` (Linear(hidden, 128), with bias): ColQwen2.5's
    parameters, without its forward (the extractor applies the head; see :mod:`.retrieval_heads`)."""

    def __init__(self, config: Qwen2_5_VLConfig) -> None:
        super().__init__(config)
        hidden_size = int(config.get_text_config().hidden_size)
        self.custom_text_proj = torch.nn.Linear(hidden_size, HEAD_DIM)
        self.post_init()


class BodyHolder(torch.nn.Module):
    """What the extractor drives: ``.model`` the Qwen2.5-VL body, ``.config`` its config."""

    def __init__(self, body: Qwen2_5_VLModel) -> None:
        super().__init__()
        self.model = body
        self.config = body.config


@dataclass(frozen=True)
class RetrievalLayout:
    """Where a retrieval checkpoint's parts are: ``base`` weights, optional ``adapter``, processor."""

    base: str
    adapter: str | None
    processor: str
    architectures: tuple[str, ...]


def find_layout(path: str) -> RetrievalLayout | None:
    """The retrieval layout at a local ``path``, or None when it is a plain checkpoint."""
    folder = Path(path)
    adapter_config = folder / "adapter_config.json"
    if adapter_config.exists():
        base = str(json.loads(adapter_config.read_text())["base_model_name_or_path"])
        carries = any((folder / name).exists() for name in ("processor_config.json", "preprocessor_config.json"))
        processor = path if carries else base
        return RetrievalLayout(base=base, adapter=path, processor=processor, architectures=_architectures(base))
    architectures = _architectures(path)
    if {"ColQwen2_5", "BiQwen2_5"} & set(architectures):
        return RetrievalLayout(base=path, adapter=None, processor=path, architectures=architectures)
    return None


def load_retrieval(
    layout: RetrievalLayout, recipe: Recipe, dtype: torch.dtype, device: torch.device
) -> tuple[Any, Any, Any]:
    """``(model, processor, head)``: the body in a :class:`BodyHolder`, the adapter merged, on ``device``.

    ``head`` is the body's ``custom_text_proj`` (None for a recipe without one).
    """
    cls = HeadedQwen2_5_VLModel if recipe.head else Qwen2_5_VLModel
    body = cls.from_pretrained(layout.base, dtype=dtype)
    if layout.adapter is not None:
        from peft import PeftModel

        # Merged once at load: the served forward is the base architecture's, at its speed.
        body = PeftModel.from_pretrained(body, layout.adapter).merge_and_unload()
        log.info("merged LoRA adapter %s into %s", layout.adapter, layout.base)
    holder = BodyHolder(body).to(device).eval()
    processor = AutoProcessor.from_pretrained(layout.processor)
    return holder, processor, body.custom_text_proj if recipe.head else None


def _architectures(path: str) -> tuple[str, ...]:
    config = Path(path) / "config.json"
    if not config.exists():
        return ()
    return tuple(json.loads(config.read_text()).get("architectures") or ())
