"""Load a Qwen2.5-VL checkpoint (hub id or local path) with its processor, on a chosen device."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from qwen25vl_embed_server.core.cpu import levers
from qwen25vl_embed_server.core.defaults import (
    BF16_ARITHMETICS,
    DEFAULT_BF16_ARITHMETIC,
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DEFAULT_FP32_MATMUL,
    FP32_MATMULS,
    TINY_MODEL_NAME,
    cache_root,
)
from qwen25vl_embed_server.core.errors import ModelLoadError
from qwen25vl_embed_server.core.model.dtypes import TORCH_DTYPES, dtype_name
from qwen25vl_embed_server.core.model.hub import reachable_source
from qwen25vl_embed_server.core.model.load_report import LoadReport, WeightCheck, one_line_reports, require_complete
from qwen25vl_embed_server.core.retrieval.adapter_spec import AdapterSpec
from qwen25vl_embed_server.core.retrieval.adapters import ServedAdapter, attach_adapters, with_final_heads
from qwen25vl_embed_server.core.retrieval.jina_model import task_recipes
from qwen25vl_embed_server.core.retrieval.layout import RetrievalLayout, detect_recipe, find_layout
from qwen25vl_embed_server.core.retrieval.model import load_retrieval
from qwen25vl_embed_server.core.retrieval.recipes import Recipe, get_recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model. ``device``/``dtype`` "auto": cuda > mps > cpu; bf16 on cuda else fp32.

    ``recipe``: "auto" (what a ColQwen2.5 / BiQwen2.5 checkpoint or adapter folder says, see
    :func:`~.layout.detect_recipe`), "none" (raw states) or a name of
    :data:`~.recipes.RECIPES`. ``pooling`` / ``image_tokens_only`` override the recipe's (see
    :func:`~.recipes.get_recipe`). ``fp32_matmul``: on the CPU, "exact"
    (torch's own fp32 matmul, bit-exact against transformers) or "onednn" (prepacked oneDNN weights,
    faster, within float rounding; see :mod:`~.packed_linear`). ``bf16_arithmetic``: for bf16 CPU
    models, "native" (torch's bf16 kernels, oneDNN-packed: bit-exact against transformers' bf16),
    "float32" (dot products widened to float32 and rounded to bf16, within bf16 rounding; see
    :mod:`~.bf16_arithmetic`) or "auto" (float32 where the CPU has no bf16 dot products).
    ``allow_partial_weights``: load a checkpoint or adapter whose weights do not all fit the model
    (missing, unexpected, of another shape), with a warning; by default such a load is refused
    (:mod:`~.load_report`). ``adapters``: retrieval adapters served beside the base
    (:mod:`~.retrieval.adapters`); with any, the base itself serves raw states.
    """

    model: str
    device: str = DEFAULT_DEVICE
    dtype: str = DEFAULT_DTYPE
    min_pixels: int | None = None
    max_pixels: int | None = None
    attn_implementation: str | None = None
    recipe: str = "auto"
    pooling: str | None = None
    image_tokens_only: bool = False
    fp32_matmul: str = DEFAULT_FP32_MATMUL
    bf16_arithmetic: str = DEFAULT_BF16_ARITHMETIC
    allow_partial_weights: bool = False
    adapters: tuple[AdapterSpec, ...] = ()

    def __post_init__(self) -> None:
        if self.fp32_matmul not in FP32_MATMULS:
            raise ValueError(f"unknown fp32 matmul {self.fp32_matmul!r}; expected one of {', '.join(FP32_MATMULS)}")
        if self.bf16_arithmetic not in BF16_ARITHMETICS:
            choices = ", ".join(BF16_ARITHMETICS)
            raise ValueError(f"unknown bf16 arithmetic {self.bf16_arithmetic!r}; expected one of {choices}")


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode on its device, with the processor that prepares its inputs.

    ``model.model`` is the Qwen2.5-VL body (``visual``, ``language_model``); ``recipe`` and ``head``
    (ColQwen2.5's ``custom_text_proj``) are set for a retrieval model. ``arithmetic``: how its dot
    products run (:data:`~.defaults.ARITHMETICS`: "exact", "fp32-onednn" or "bf16-float32").
    ``report``: what loading found (the recipe's grounds, each file set's weights). ``adapters``:
    the retrieval adapters served beside the base, by name (empty: none).
    """

    name: str
    model: Any
    processor: Any
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    recipe: Recipe | None = None
    head: Any = None
    arithmetic: str = "exact"
    report: LoadReport | None = None
    adapters: Mapping[str, ServedAdapter] = field(default_factory=dict)

    @property
    def visual(self) -> Any:
        return self.model.model.visual

    @property
    def language_model(self) -> Any:
        return self.model.model.language_model


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; anything else as given."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on cuda, float32 elsewhere; else "float32" | "float16" | "bfloat16"."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return TORCH_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto, {', '.join(TORCH_DTYPES)}") from None


def check_device(device: str) -> torch.device:
    """``device`` resolved (:func:`resolve_device`), refused with a one-line ValueError if this
    machine does not have it, before anything is loaded."""
    try:
        resolved = resolve_device(device)
    except RuntimeError as err:  # torch's own message for a malformed string
        raise ValueError(f"unknown device {device!r}; expected auto, cpu, cuda, cuda:<n> or mps ({err})") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r}: no CUDA GPU is available here (try --device cpu)")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available here (try --device cpu)")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {device!r}; expected auto, cpu, cuda, cuda:<n> or mps")
    return resolved


def check_options(options: LoadOptions) -> None:
    """Refuse a device or dtype that cannot work, with a one-line ValueError, before loading."""
    resolve_dtype(options.dtype, check_device(options.device))


def tiny_model_dir() -> Path:
    """Where the ``tiny-random`` checkpoint is built once and then reused."""
    return cache_root() / TINY_MODEL_NAME


def resolve_model_path(model: str) -> str:
    """``tiny-random`` -> a locally built random-weight checkpoint; anything else unchanged."""
    if model != TINY_MODEL_NAME:
        return model
    from qwen25vl_embed_server.core.fixtures.tiny_model import build_tiny_model  # only for tiny-random

    path = tiny_model_dir()
    if not (path / "config.json").exists():
        # Build beside, then rename: concurrent processes never see a half-written checkpoint.
        staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        build_tiny_model(staging)
        try:
            staging.rename(path)
        except OSError:  # another process finished first; its checkpoint is identical
            shutil.rmtree(staging, ignore_errors=True)
    return str(path)


def load_model(options: LoadOptions) -> LoadedModel:
    """Load model and processor.

    Raises:
        ValueError: a device this machine lacks, or an unknown dtype (:func:`check_options`).
        ModelLoadError: the checkpoint could not be loaded (bad id or path, hub unreachable,
            weights that do not all fit the model, see ``allow_partial_weights``); one line, the
            cause chained. A hub id is not waited for: when the hub does not answer
            (:func:`~.hub.reachable_source`), the hub cache serves it, or the error names the ways
            to load without the hub.
    """
    started = time.perf_counter()
    device = check_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    try:
        return _load(options, device, dtype, started)
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # what transformers raises for a bad checkpoint
        cause = " ".join(str(err).split()) or type(err).__name__
        raise ModelLoadError(f"cannot load model {options.model!r}: {cause}") from err


def _load(options: LoadOptions, device: torch.device, dtype: torch.dtype, started: float) -> LoadedModel:
    # Asked before transformers' first request, which would retry each file for minutes without the hub.
    path = reachable_source(resolve_model_path(options.model))
    layout = find_layout(path)
    if layout is not None and (base := reachable_source(layout.base)) != layout.base:
        # A local adapter on a hub id's base, without the hub: the base's snapshot in the hub cache.
        processor_path = base if layout.processor == layout.base else layout.processor
        layout = replace(layout, base=base, processor=processor_path)
    recipe, reason = choose_recipe(options, layout) if not options.adapters else _adapters_base(options, layout)
    head = None
    checks: tuple[WeightCheck, ...] = ()
    if layout is not None:
        body = recipe or _body_recipe(layout)
        recipe, body = task_recipes(layout, recipe, body)  # jina-embeddings-v4: its checkpoint's tasks
        model, processor, head, checks = load_retrieval(layout, body, dtype, device, options.allow_partial_weights)
        head = head if recipe is not None else None
    else:
        if recipe is not None and recipe.head:
            raise ValueError(f"recipe {recipe.name} needs a custom_text_proj head; {path} is a plain checkpoint")
        processor = AutoProcessor.from_pretrained(path)
        if not hasattr(processor, "image_processor"):
            named = type(processor).__name__
            raise ValueError(f"{path}: its processor files give a {named}, not a Qwen2.5-VL processor")
    size = dict(processor.image_processor.size)
    if options.min_pixels is not None:
        size["shortest_edge"] = options.min_pixels
    if options.max_pixels is not None:
        size["longest_edge"] = options.max_pixels
    processor.image_processor.size = {k: size[k] for k in ("shortest_edge", "longest_edge")}
    if layout is None:
        kwargs: dict[str, Any] = {"dtype": dtype}
        if options.attn_implementation:
            kwargs["attn_implementation"] = options.attn_implementation
        with one_line_reports():
            loaded = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True, **kwargs)
        model, info = cast("tuple[Any, dict[str, Any]]", loaded)
        check = WeightCheck.of_checkpoint(path, model, info)
        require_complete(check, options.allow_partial_weights)
        checks = (check,)
        model = model.to(device).eval()
    base = layout.base if layout is not None else path
    adapters = attach_adapters(model, base, options.adapters, aliases=(options.model,)) if options.adapters else {}
    # The weights have their final device and dtype (and any adapter is merged): the CPU levers now.
    applied = levers.apply(model, head, device, dtype, options.fp32_matmul, options.bf16_arithmetic)
    adapters = with_final_heads(model, adapters) if adapters else {}
    seconds = time.perf_counter() - started
    log.info(
        "loaded %s on %s (%s%s) in %.1f s, recipe %s (%s)",
        options.model,
        device,
        dtype_name(dtype),
        f", {applied.summary}" if applied.summary else "",
        seconds,
        recipe.name if recipe else "none",
        reason,
    )
    return LoadedModel(
        name=options.model,
        model=model,
        processor=processor,
        device=device,
        dtype=dtype,
        load_seconds=seconds,
        recipe=recipe,
        head=applied.head,
        arithmetic=applied.arithmetic,
        report=LoadReport(
            recipe=recipe.name if recipe else None,
            recipe_reason=reason,
            base=base,
            adapter=layout.adapter if layout is not None else None,
            weights=checks,
        ),
        adapters=adapters,
    )


def choose_recipe(options: LoadOptions, layout: RetrievalLayout | None) -> tuple[Recipe | None, str]:
    """The recipe ``options`` ask for and why; "auto": the one the checkpoint says it has
    (:func:`~.layout.detect_recipe`; ValueError when the checkpoint contradicts itself)."""
    name: str | None = options.recipe
    reason = f"recipe {options.recipe!r} asked for"
    if name == "auto":
        name, reason = detect_recipe(layout) if layout is not None else (None, "a plain checkpoint")
    if name in (None, "none"):
        return None, reason
    assert name is not None
    return get_recipe(name, options.pooling, options.image_tokens_only), reason


def _adapters_base(options: LoadOptions, layout: RetrievalLayout | None) -> tuple[None, str]:
    """With adapters, the base serves raw states: refuse an adapter folder as the base, or a recipe."""
    if layout is not None and layout.adapter is not None:
        raise ValueError(
            f"{options.model} is an adapter folder; with --adapter, --model is the base ({layout.base}) "
            f"and each adapter is given as --adapter NAME=PATH"
        )
    if options.recipe not in ("auto", "none"):
        raise ValueError(f"--recipe {options.recipe} serves a model alone; with --adapter each adapter has its recipe")
    return None, f"the base of {len(options.adapters)} adapter(s), as raw states"


def _body_recipe(layout: RetrievalLayout) -> Recipe:
    """For raw states ("none") of a retrieval checkpoint: the recipe whose body fits its weights (a
    ColQwen2.5's head and its LoRA load, unused), BiQwen2.5's when the checkpoint names none."""
    try:
        name, _ = detect_recipe(layout)
    except ValueError:  # a checkpoint that names both: the bare body; its weights are checked as ever
        name = None
    return get_recipe(name or "biqwen2.5")
