"""Several retrieval adapters on one served base: each adapter's LoRA beside the shared base
weights (:mod:`.lora`), its own head, its recipe, chosen per request by name.

An adapter kind (:class:`AdapterKind`) says which folders it reads and how it turns one into a
:class:`ServedAdapter`; :func:`adapter_kinds` lists them, first match wins. ``jina``: a folder in
jina-embeddings-v4's layout, one LoRA per task (:mod:`.jina_adapter`). ``colpali``: a
ColQwen2.5 / BiQwen2.5 PEFT LoRA folder (the recipe read as :func:`~.layout.detect_recipe` reads
it; ColQwen2.5's head is the base's ``custom_text_proj`` with the adapter's LoRA merged into a copy
of it, or the adapter's own ``custom_text_proj`` weights).

Each adapter must have been made for the served base (:func:`check_base`): the adapter's
``base_model_name_or_path`` names the served base, or names a checkpoint here whose configuration
and sampled weights equal the served base's; and every LoRA factor fits the base's layer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from torch import nn

from qwen25vl_embed_server.core.retrieval import lora
from qwen25vl_embed_server.core.retrieval.adapter_spec import AdapterSpec
from qwen25vl_embed_server.core.retrieval.layout import HEAD_MODULE, RetrievalLayout, carries_processor, detect_recipe
from qwen25vl_embed_server.core.retrieval.model import COLPALI_KEY_MAPPING
from qwen25vl_embed_server.core.retrieval.recipes import Recipe, get_recipe

log = logging.getLogger(__name__)

HEADS_ATTRIBUTE = "adapter_heads"
"""Where the adapters' heads sit on the served model (an ``nn.ModuleDict``): the CPU levers, which
walk the model's modules, then reach them as they reach the base's own layers."""


@dataclass(frozen=True)
class ServedAdapter:
    """An adapter as served: its ``recipe``, ``head`` (None for a recipe without one; replaced by
    the CPU levers' form after loading), ``dimension`` (its vectors' size), ``kind`` and ``path``."""

    name: str
    path: str
    kind: str
    recipe: Recipe
    dimension: int
    head: Any = None


class AdapterKind(Protocol):
    """One kind of adapter folder."""

    name: str

    def claims(self, folder: str) -> bool:
        """Whether ``folder`` is of this kind."""
        ...

    def attach(self, spec: AdapterSpec, body: Any, base: str, aliases: tuple[str, ...]) -> ServedAdapter:
        """Check ``spec``'s folder against the served ``body`` (loaded from ``base``, also named
        ``aliases``), put its LoRA beside the body's layers under ``spec.name`` and return what
        serves it. Raises ValueError."""
        ...


class ColpaliAdapters:
    """ColQwen2.5 / BiQwen2.5 LoRA folders (colpali-engine's, vidore's, nomic's layouts)."""

    name = "colpali"

    def claims(self, folder: str) -> bool:
        return (Path(folder) / "adapter_config.json").exists()

    def attach(self, spec: AdapterSpec, body: Any, base: str, aliases: tuple[str, ...]) -> ServedAdapter:
        config = json.loads((Path(spec.path) / "adapter_config.json").read_text())
        check_base(str(config.get("base_model_name_or_path") or ""), (base, *aliases), body)
        processor = spec.path if carries_processor(spec.path) else base
        if (theirs := _pixel_range(spec.path)) != (ours := _pixel_range(base)) and theirs is not None:
            log.warning(
                "adapter %s: its processor resizes images to %s pixels, the served base's to %s; the base's "
                "range applies (a request may ask for the adapter's with min_pixels / max_pixels)",
                spec.name,
                theirs,
                ours,
            )
        name, reason = detect_recipe(RetrievalLayout(base=base, adapter=spec.path, processor=processor))
        if name is None:
            raise ValueError(reason)
        recipe = get_recipe(name)
        factors, full = lora.read_factors(spec.path, COLPALI_KEY_MAPPING)
        head = _head(spec, body, factors.pop(HEAD_MODULE, None), full) if recipe.head else None
        unexpected = [key for key in full if not key.startswith(f"{HEAD_MODULE}.")]
        if unexpected:
            raise ValueError(f"weights outside LoRA: {', '.join(unexpected[:3])}")
        attach_factors(spec, body, factors)
        hidden = int(body.config.get_text_config().hidden_size)
        dimension = int(head.out_features) if head is not None else hidden
        log.info("adapter %s: %s from %s (%s), %d LoRA layers", spec.name, recipe.name, spec.path, reason, len(factors))
        return ServedAdapter(spec.name, spec.path, self.name, recipe, dimension, head)


def adapter_kinds() -> list[AdapterKind]:
    """The adapter kinds, first claim wins (a kind added here serves with no other change)."""
    from qwen25vl_embed_server.core.retrieval.jina_adapter import JinaAdapters  # it builds on this module

    return [JinaAdapters(), ColpaliAdapters()]


def attach_adapters(
    model: Any, base: str, specs: tuple[AdapterSpec, ...], aliases: tuple[str, ...] = ()
) -> dict[str, ServedAdapter]:
    """Every adapter of ``specs`` on the served ``model`` (``model.model`` the Qwen2.5-VL body,
    loaded from ``base``, also known as ``aliases``: the name it was asked by), in order; their
    heads under :data:`HEADS_ATTRIBUTE`.

    Raises:
        ValueError: a repeated name, a folder no kind reads, an adapter made for another base or
            one that does not fit it (one line starting ``--adapter NAME=PATH:``).
    """
    served: dict[str, ServedAdapter] = {}
    heads = nn.ModuleDict()
    for spec in specs:
        if spec.name in served:
            raise ValueError(f"adapter name {spec.name!r} is given twice")
        kind = next((kind for kind in adapter_kinds() if kind.claims(spec.path)), None)
        try:
            if kind is None:
                raise ValueError(
                    "not an adapter folder (no adapter_config.json, nor jina-embeddings-v4's layout); a "
                    "merged checkpoint carries its own base: serve it alone with --model"
                )
            adapter = kind.attach(spec, model.model, base, aliases)
        except ValueError as err:
            raise ValueError(f"--adapter {spec.name}={spec.path}: {err}") from err
        served[spec.name] = adapter
        if adapter.head is not None:
            heads[spec.name] = adapter.head
    model.add_module(HEADS_ATTRIBUTE, heads)
    return served


def with_final_heads(model: nn.Module, adapters: Mapping[str, ServedAdapter]) -> dict[str, ServedAdapter]:
    """``adapters`` with each head as it now runs on ``model`` (after the CPU levers replaced it)."""
    from dataclasses import replace

    heads = getattr(model, HEADS_ATTRIBUTE)
    return {name: replace(a, head=heads[name] if a.head is not None else None) for name, a in adapters.items()}


def attach_factors(spec: AdapterSpec, body: nn.Module, factors: dict[str, lora.LoraFactors]) -> None:
    """Put ``factors`` beside the body's layers under ``spec.name``; vision-tower targets refused
    (the tower runs the images of a batch as one sequence, with no row per request)."""
    problems = []
    for module, factor in factors.items():
        if module.startswith("visual."):
            problems.append(f"{module}: LoRA on the vision tower is not supported")
            continue
        try:
            layer = lora.install(body, module)
        except ValueError as err:
            problems.append(str(err))
            continue
        if (problem := lora.check_fits(module, layer, factor)) is None:
            layer.add(spec.name, factor)
        else:
            problems.append(problem)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"the adapter does not fit the served base: {'; '.join(problems[:3])}{more}")


def _head(
    spec: AdapterSpec, body: nn.Module, factor: lora.LoraFactors | None, full: dict[str, torch.Tensor]
) -> nn.Linear:
    """The adapter's head: its own weights, else the base's head with the adapter's LoRA merged
    (as peft merges: ``W + B @ A * scale``) into a copy."""
    base_head = getattr(body, HEAD_MODULE, None)
    if f"{HEAD_MODULE}.weight" in full:
        weight, bias = full[f"{HEAD_MODULE}.weight"], full.get(f"{HEAD_MODULE}.bias")
    elif isinstance(base_head, nn.Linear):
        weight, bias = base_head.weight.detach(), base_head.bias.detach() if base_head.bias is not None else None
    else:
        raise ValueError(f"the recipe needs a {HEAD_MODULE} head: neither the served base nor the adapter has one")
    head = linear_like(body, weight, bias)
    if factor is not None:
        if (problem := lora.check_fits(HEAD_MODULE, head, factor)) is not None:
            raise ValueError(f"the adapter does not fit the served base: {problem}")
        with torch.no_grad():
            head.weight += factor.delta_weight().to(head.weight.device, head.weight.dtype)
    return head


def linear_like(body: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A linear layer (in eval mode) holding ``weight`` [out, in] and ``bias``, on ``body``'s device and dtype."""
    reference = next(body.parameters())
    layer = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=reference.device, dtype=reference.dtype
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.eval()


def check_base(named: str, served: tuple[str, ...], body: Any) -> None:
    """Refuse an adapter made for base ``named`` when the server serves another than ``served``
    (its folder, then the names it was asked by): a ValueError naming both.

    The same name (or the same folder) passes. Another name passes only when it is a checkpoint
    here whose text and vision sizes and sampled weights (:func:`_fingerprint`) equal the served
    body's, as a copy of the base in another folder has.
    """
    if not named or any(named == name or _same_folder(named, name) for name in served):
        return
    where = f"the adapter was made for base {named!r}, but the server serves {served[-1]!r}"
    folder = _local_checkpoint(named)
    if folder is None:
        raise ValueError(f"{where}, and {named!r} is not here to compare; serve the adapter on its own base")
    config = json.loads((folder / "config.json").read_text())
    theirs, ours = _sizes(config), _sizes(body.config.to_dict())
    if theirs != ours:
        raise ValueError(f"{where}: its sizes {theirs} differ from the served base's {ours}")
    sampled = _fingerprint(folder)
    if not sampled:
        raise ValueError(f"{where}, and {named!r} has no safetensors weights to compare")
    differing = [key for key, tensor in sampled.items() if not _equal(tensor, _own_tensor(body, key))]
    if differing:
        raise ValueError(f"{where}: their weights differ ({', '.join(differing)})")
    log.info("base %s is the served base (same sizes and sampled weights)", named)


def _pixel_range(folder: str) -> tuple[Any, Any] | None:
    """(min, max) pixels a folder's image processor files set, or None when it has none."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        file = Path(folder) / name
        if file.exists():
            config = json.loads(file.read_text())
            config = config.get("image_processor", config)
            size = config.get("size") or {}
            return (
                config.get("min_pixels", size.get("shortest_edge")),
                config.get("max_pixels", size.get("longest_edge")),
            )
    return None


def _same_folder(a: str, b: str) -> bool:
    return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()


def _local_checkpoint(named: str) -> Path | None:
    if (Path(named) / "config.json").exists():
        return Path(named)
    try:  # a hub id: its snapshot in the hub cache, never the network
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(named, "config.json")
    except (ValueError, OSError):
        return None
    return Path(found).parent if isinstance(found, str) else None


_SIZE_KEYS = ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size", "num_attention_heads")


def _sizes(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config") or {}
    vision = config.get("vision_config") or {}
    sizes = {key: text.get(key, config.get(key)) for key in _SIZE_KEYS}
    return sizes | {"vision_hidden_size": vision.get("hidden_size"), "vision_depth": vision.get("depth")}


# Sampled weights (the body's names): a few rows each, enough to tell two trainings apart.
_FINGERPRINT = ("language_model.embed_tokens.weight", "language_model.layers.0.self_attn.q_proj.weight")
_ROWS = 8


def _fingerprint(folder: Path) -> dict[str, torch.Tensor]:
    """The first rows of :data:`_FINGERPRINT`'s tensors in ``folder``'s weight files (any names)."""
    found: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as opened:
            for key in opened.keys():  # noqa: SIM118 - safe_open is not a mapping
                own = next((name for name in _FINGERPRINT if key.endswith(name.removeprefix("language_model."))), None)
                if own is not None and "visual" not in key and own not in found:
                    found[own] = opened.get_slice(key)[:_ROWS]
    return found


def _own_tensor(body: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attribute = name.rpartition(".")
    module = body.get_submodule(module_name)
    if isinstance(module, lora.MultiLoraLinear):
        module = module.base
    tensor: torch.Tensor = getattr(module, attribute)
    return tensor[:_ROWS]


def _equal(theirs: torch.Tensor, ours: torch.Tensor) -> bool:
    return theirs.shape == ours.shape and bool(torch.equal(theirs.to(ours.device, ours.dtype), ours.detach()))
