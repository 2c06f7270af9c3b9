"""jina-embeddings-v4 as an adapter kind: its task LoRAs and heads on a served Qwen2.5-VL base.

``--adapter NAME=FOLDER`` with a folder in jina-embeddings-v4's published layout
(:func:`~.jina_model.is_jina_folder`): the folder's base weights must be the served base's
(:func:`~.adapters.check_base`: same sizes and sampled weights; the folder itself is the base it
was made for); each task's LoRA goes beside the base's layers under ``NAME:TASK``
(:func:`~.lora.lora_key`), so requests of any adapter and any task share a forward. The heads
are the recipe's: the single vector pooled over the image's vision span (Matryoshka sizes from
the folder's config) and the multi-vector from the folder's ``multi_vector_projector`` with the
task's LoRA beside it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from qwen25vl_embed_server.core.retrieval import lora
from qwen25vl_embed_server.core.retrieval.adapter_spec import AdapterSpec
from qwen25vl_embed_server.core.retrieval.adapters import ServedAdapter, attach_factors, check_base, linear_like
from qwen25vl_embed_server.core.retrieval.jina_model import (
    ADAPTERS,
    KEY_MAPPING,
    PROJECTOR,
    checkpoint_recipe,
    is_jina_folder,
)
from qwen25vl_embed_server.core.retrieval.recipes import get_recipe

log = logging.getLogger(__name__)

_TASK_OF_KEY = re.compile(r"\.lora_[AB]\.(?P<task>[^.]+)\.weight$")


class JinaAdapters:
    """Folders in jina-embeddings-v4's layout: one base, ``adapters/`` with a LoRA per task."""

    name = "jina"

    def claims(self, folder: str) -> bool:
        return is_jina_folder(folder)

    def attach(self, spec: AdapterSpec, body: Any, base: str, aliases: tuple[str, ...]) -> ServedAdapter:
        # The folder holds the base it was made for: it must be the served one.
        check_base(spec.path, (base, *aliases), body)
        recipe = checkpoint_recipe(spec.path, get_recipe("jina-v4"))
        folder = str(Path(spec.path) / ADAPTERS)
        per_task = {task: lora.read_factors(folder, KEY_MAPPING, task=task)[0] for task in recipe.tasks}
        _check_tasks(folder, per_task)
        head = lora.MultiLoraLinear(_projector(spec.path, body))
        for task, factors in per_task.items():
            key = lora.lora_key(spec.name, task)
            assert key is not None
            projector_factors = factors.pop(PROJECTOR, None)
            if projector_factors is not None:
                if (problem := lora.check_fits(PROJECTOR, head, projector_factors)) is not None:
                    raise ValueError(f"the adapter does not fit the served base: {problem}")
                head.add(key, projector_factors)
            attach_factors(AdapterSpec(key, spec.path), body, factors)
        hidden = int(body.config.get_text_config().hidden_size)
        layers = len(next(iter(per_task.values()), {}))
        log.info(
            "adapter %s: %s from %s, tasks %s, %d LoRA layers each",
            spec.name,
            recipe.name,
            spec.path,
            ", ".join(recipe.tasks),
            layers,
        )
        return ServedAdapter(spec.name, spec.path, self.name, recipe, hidden, head.eval())


def _check_tasks(folder: str, per_task: dict[str, dict[str, lora.LoraFactors]]) -> None:
    """Every listed task has factors, the same modules as the others; no factors of an unlisted task."""
    modules = {task: set(factors) for task, factors in per_task.items()}
    everything = set().union(*modules.values())
    for task, own in modules.items():
        if not own:
            raise ValueError(f"{folder} has no LoRA for task {task!r}, which config.json's task_names lists")
        if missing := sorted(everything - own):
            raise ValueError(f"{folder}: task {task!r} has no LoRA for {', '.join(missing[:3])}")
    with safe_open(str(Path(folder) / "adapter_model.safetensors"), framework="pt") as opened:
        found = {match["task"] for key in opened.keys() if (match := _TASK_OF_KEY.search(key))}  # noqa: SIM118
    if unlisted := sorted(found - set(per_task)):
        raise ValueError(f"{folder} has LoRAs of task(s) {', '.join(unlisted)}, which config.json's task_names lacks")


def _projector(path: str, body: Any) -> nn.Linear:
    """The folder's ``multi_vector_projector`` (Linear(hidden, 128) with bias) on the body's device and dtype."""
    found: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as opened:
            for key in opened.keys():  # noqa: SIM118 - safe_open is not a mapping
                if key.endswith((f"{PROJECTOR}.weight", f"{PROJECTOR}.bias")):
                    found[key.rpartition(".")[2]] = opened.get_tensor(key)
    if "weight" not in found:
        raise ValueError(f"{path} has no {PROJECTOR} weights")
    weight, bias = found["weight"], found.get("bias")
    hidden = int(body.config.get_text_config().hidden_size)
    if weight.shape[1] != hidden:
        raise ValueError(f"its {PROJECTOR} takes {weight.shape[1]} inputs; the served base's hidden size is {hidden}")
    return linear_like(body, weight, bias)
