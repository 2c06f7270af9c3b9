"""Load jina-embeddings-v4 as published: one base folder, one ``adapters/`` folder with a LoRA per task.

The folder's ``config.json`` names ``JinaEmbeddingsV4Model`` (a Qwen2.5-VL subclass; its
``auto_map`` points at remote code, so the Qwen2.5-VL classes load it here) and adds
``task_names``, ``matryoshka_dims`` and ``multi_vector_projector_dim``. The base weights hold the
Qwen2.5-VL body (under transformers 4's names ``model.layers...`` / ``visual...`` or transformers
5's ``model.language_model...`` / ``model.visual...``), ``lm_head`` (unused, left out) and
``multi_vector_projector`` (Linear(hidden, 128), with bias).

``adapters/adapter_model.safetensors`` holds ``base_model.model.<module>.lora_A.<task>.weight``
``[r, in]`` and ``...lora_B.<task>.weight`` ``[out, r]`` for every task; ``adapter_config.json``
gives ``r`` and ``lora_alpha`` (scaling ``alpha / r``; dropout is off at inference). Each
targeted linear layer becomes a :class:`~.lora.MultiLoraLinear` holding every task's factors as
one adapter per task, named by the task: nothing is merged, a batch may mix tasks (each row its
task's LoRA, :func:`~.lora.adapter_rows`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor

from qwen25vl_embed_server.core.model.load_report import WeightCheck, one_line_reports, require_complete
from qwen25vl_embed_server.core.retrieval import lora
from qwen25vl_embed_server.core.retrieval.layout import RetrievalLayout
from qwen25vl_embed_server.core.retrieval.model import COLPALI_KEY_MAPPING, BodyHolder, _RetrievalBody
from qwen25vl_embed_server.core.retrieval.recipes import Recipe

log = logging.getLogger(__name__)

ARCHITECTURE = "JinaEmbeddingsV4Model"
ADAPTERS = "adapters"
PROJECTOR = "multi_vector_projector"

KEY_MAPPING: dict[str, str] = {
    r"^model\.language_model\.": "language_model.",
    r"^model\.visual\.": "visual.",
    **COLPALI_KEY_MAPPING,
}
"""Checkpoint key (regex) -> the body's module name, for both generations of Qwen2.5-VL names."""

_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.(?P<task>[^.]+)\.weight$")


def is_jina_folder(path: str) -> bool:
    """A local folder in jina-embeddings-v4's layout (config naming the class, an adapters folder)."""
    config = Path(path) / "config.json"
    if not config.exists() or not (Path(path) / ADAPTERS / "adapter_config.json").exists():
        return False
    return ARCHITECTURE in (json.loads(config.read_text()).get("architectures") or ())


def checkpoint_recipe(path: str, recipe: Recipe) -> Recipe:
    """``recipe`` with the checkpoint's own ``task_names`` and ``matryoshka_dims``."""
    config = json.loads((Path(path) / "config.json").read_text())
    tasks = tuple(str(task) for task in config.get("task_names") or recipe.tasks)
    dims = tuple(int(dim) for dim in config.get("matryoshka_dims") or recipe.matryoshka_dims)
    return recipe.with_tasks(tasks, dims)


def task_recipes(layout: RetrievalLayout, recipe: Recipe | None, body: Recipe) -> tuple[Recipe | None, Recipe]:
    """``recipe`` (the one served; None: raw states) and ``body`` (the one whose weights load) for
    the checkpoint at ``layout``: with a jina-embeddings-v4 folder's own tasks and Matryoshka sizes.

    Raises:
        ValueError: a recipe with tasks for a folder without them, or the other way round.
    """
    jina = layout.adapter is None and is_jina_folder(layout.base)
    for chosen in (recipe, body):
        if chosen is not None and bool(chosen.tasks) != jina:
            if jina:
                raise ValueError(f"recipe {chosen.name} cannot serve {layout.base}: it is a jina-embeddings-v4 folder")
            raise ValueError(
                f"recipe {chosen.name} needs a folder in jina-embeddings-v4's layout "
                f"(config.json naming {ARCHITECTURE}, an {ADAPTERS}/ folder); {layout.base} is not one"
            )
    if not jina:
        return recipe, body
    return (checkpoint_recipe(layout.base, recipe) if recipe else None), checkpoint_recipe(layout.base, body)


class JinaBody(_RetrievalBody):
    """jina-embeddings-v4's parameters: the Qwen2.5-VL body plus ``multi_vector_projector``."""

    _checkpoint_conversion_mapping = KEY_MAPPING

    def __init__(self, config: Qwen2_5_VLConfig) -> None:
        super().__init__(config)
        hidden_size = int(config.get_text_config().hidden_size)
        projector_dim = int(getattr(config, "multi_vector_projector_dim", 128))
        self.multi_vector_projector = torch.nn.Linear(hidden_size, projector_dim)
        self.post_init()


def load_jina(
    path: str, recipe: Recipe, dtype: torch.dtype, device: torch.device, allow_partial: bool = False
) -> tuple[Any, Any, Any, tuple[WeightCheck, ...]]:
    """``(model, processor, head, checks)`` as :func:`~.model.load_retrieval` gives them: the body
    in a :class:`~.model.BodyHolder` with every task's LoRA beside its layers (one adapter per
    task, named by the task: :func:`~.lora.adapter_rows` picks them per batch row), on ``device``;
    ``head`` the projector (a :class:`~.lora.MultiLoraLinear`, its tasks' LoRAs beside it).

    Raises:
        ValueError: weights missing, unexpected or of another shape (one line), unless
            ``allow_partial``; an adapter config without ``r``.
    """
    kwargs: dict[str, Any] = {"dtype": dtype, "key_mapping": KEY_MAPPING, "output_loading_info": True}
    # The published config asks for flash-attention 2; SDPA computes the same attention everywhere.
    kwargs["attn_implementation"] = "sdpa"
    with one_line_reports():
        loaded = JinaBody.from_pretrained(path, **kwargs)
    body, info = cast("tuple[Any, dict[str, Any]]", loaded)
    base_check = WeightCheck.of_checkpoint(path, body, info)
    require_complete(base_check, allow_partial)
    holder = BodyHolder(body).to(device).eval()
    # On the device first: each LoRA factor follows its base layer's device and dtype as it is added.
    adapter_check = install_task_loras(body, str(Path(path) / ADAPTERS), recipe.tasks)
    require_complete(adapter_check, allow_partial)
    log.info("installed %d task LoRAs (%s) on %s", len(recipe.tasks), ", ".join(recipe.tasks), path)
    # The config's auto_map names remote code: never run it (nor ask whether to, on a terminal).
    processor = Qwen2_5_VLProcessor.from_pretrained(path, trust_remote_code=False)
    return holder, processor, body.multi_vector_projector, (base_check, adapter_check)


def install_task_loras(body: torch.nn.Module, folder: str, tasks: tuple[str, ...]) -> WeightCheck:
    """Put every task's LoRA of the adapter folder beside the layers it targets
    (:class:`~.lora.MultiLoraLinear`, one adapter per task, named by the task), and check the
    folder's weights against them: keys of a task the model does not list are unexpected; a
    listed task without factors for a layer another task targets, missing.

    Raises:
        ValueError: a factor for a module the body lacks or of another shape; a LoRA variant these
            layers do not compute (:func:`~.lora.read_factors`).
    """
    per_task = {task: lora.read_factors(folder, KEY_MAPPING, task=task)[0] for task in tasks}
    modules = sorted({module for factors in per_task.values() for module in factors})
    missing: list[str] = []
    for module in modules:
        layer = lora.install(body, module)
        for task, factors in per_task.items():
            found = factors.get(module)
            if found is None:
                missing += [f"{module}.lora_{factor}.{task}.weight" for factor in "AB"]
                continue
            if (problem := lora.check_fits(module, layer, found)) is not None:
                raise ValueError(f"adapter {folder}: {problem}")
            layer.add(task, found)
    with safe_open(str(Path(folder) / "adapter_model.safetensors"), framework="pt") as opened:
        keys = list(opened.keys())
    unexpected = [key for key in keys if (match := _LORA_KEY.match(key)) is None or match["task"] not in tasks]
    return WeightCheck.of(
        "adapter", folder, expected=2 * len(tasks) * len(modules), missing=missing, unexpected=unexpected
    )
