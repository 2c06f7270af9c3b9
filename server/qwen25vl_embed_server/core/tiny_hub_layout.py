"""Rewrite a tiny checkpoint into the layout of Qwen/Qwen2.5-VL-3B/7B-Instruct as published on the hub.

:func:`~.tiny_model.build_tiny_model` writes what transformers 5 writes: one ``model.safetensors``,
a ``config.json`` with ``text_config`` nested, ``processor_config.json``, ``chat_template.jinja``.
The published folders were written by transformers 4 and look different; a user's ``--model``
folder downloaded from the hub is one of them. :func:`write_hub_layout` turns a tiny checkpoint
into that layout, same weights and settings, so that loading it goes down the paths a real
download takes:

- weights under the transformers 4 names (``model.layers.N...``, ``visual.blocks...``,
  ``lm_head.weight``; transformers 5 renames them on load), in ``model-0000K-of-0000N.safetensors``
  shards with ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``);
- ``config.json`` flat: the text settings at the top level, ``rope_theta`` and ``rope_scaling``
  (``{"type": "mrope", "mrope_section": [...]}``), ``vision_config`` nested, ``torch_dtype``;
- ``preprocessor_config.json`` (``Qwen2VLImageProcessor`` with ``min_pixels`` / ``max_pixels``),
  ``chat_template.json`` (``{"chat_template": ...}``), no ``processor_config.json``;
- ``tokenizer.json``, ``vocab.json``, ``merges.txt`` and a ``Qwen2Tokenizer``
  ``tokenizer_config.json``; ``generation_config.json`` with the token ids.

Values come from the tiny checkpoint, never from the released models: only the layout is theirs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwen25vl_embed_server.core.tiny_model import TinyShape, build_tiny_model

# What the published config.json files say they were written with.
PUBLISHED_TRANSFORMERS_VERSION = "4.41.2"

# transformers 5 name prefix -> the published (transformers 4) one. transformers 5 maps them back
# on load (conversion_mapping.py: Qwen2VLForConditionalGeneration, reused by Qwen2.5-VL).
_PREFIXES = (
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
    ("lm_head.", "lm_head."),
    # Already published names (transformers 5.24's save_pretrained writes these): unchanged.
    ("model.", "model."),
    ("visual.", "visual."),
)

# The vision settings a published vision_config carries (transformers 4 names).
_VISION_KEYS = (
    "depth",
    "hidden_act",
    "hidden_size",
    "intermediate_size",
    "num_heads",
    "in_chans",
    "out_hidden_size",
    "patch_size",
    "spatial_merge_size",
    "spatial_patch_size",
    "window_size",
    "fullatt_block_indexes",
    "tokens_per_second",
    "temporal_patch_size",
)
# Where transformers 5 keeps the published vision settings it names otherwise, or not at all.
_VISION_SOURCES = {"in_chans": "in_channels", "spatial_patch_size": "patch_size"}

# Text settings transformers 4 did not write: derived again on load (layer_types from
# sliding_window / max_window_layers) or written under other names (rope_parameters).
_TEXT_KEYS_NOT_WRITTEN = frozenset({"model_type", "layer_types", "rope_parameters", "dtype", "torch_dtype"})


def hub_weight_name(name: str) -> str:
    """The published name of a Qwen2.5-VL weight given under its transformers 5 (or published) name.

    Raises:
        ValueError: a name outside the language model, the vision tower and ``lm_head``.
    """
    for new, old in _PREFIXES:
        if name.startswith(new):
            return old + name[len(new) :]
    raise ValueError(f"not a Qwen2.5-VL weight name: {name!r}")


def write_hub_layout(source: str | Path, outdir: str | Path, shards: int = 2) -> Path:
    """Write the checkpoint at ``source`` (as :func:`~.tiny_model.build_tiny_model` writes it) to
    ``outdir`` in the published hub layout (see the module's docstring); return ``outdir``.

    Weights are stored as they are (same dtype, same bytes), in ``shards`` files of about equal
    size, each holding whole tensors in name order.

    Raises:
        ValueError: ``shards`` below 1 or above the number of tensors; a weight name that is no
            Qwen2.5-VL one.
    """
    src, out = Path(source), Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {hub_weight_name(name): tensor for name, tensor in _read_weights(src)}
    _write_shards(tensors, out, shards)
    config = _read_json(src / "config.json")
    tokenizer = _read_json(src / "tokenizer.json")
    special = {token["content"]: int(token["id"]) for token in tokenizer.get("added_tokens", [])}
    _write_json(out / "config.json", hub_config(config, special))
    _write_json(out / "generation_config.json", _generation_config(config))
    processor = _read_json(src / "processor_config.json")
    _write_json(out / "preprocessor_config.json", hub_preprocessor_config(processor["image_processor"]))
    template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    _write_json(out / "chat_template.json", {"chat_template": template})
    _write_tokenizer(src, out, tokenizer, template)
    return out


def build_tiny_hub_model(
    outdir: str | Path,
    shape: TinyShape | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shards: int = 2,
) -> Path:
    """:func:`~.tiny_model.build_tiny_model` written in the published hub layout at ``outdir``.

    The same ``shape`` (None: the default :class:`~.tiny_model.TinyShape`), ``seed`` and ``dtype``
    give the same weights as ``build_tiny_model``."""
    with tempfile.TemporaryDirectory(prefix="tiny-qwen25vl-") as staging:
        return write_hub_layout(
            build_tiny_model(staging, shape=shape or TinyShape(), seed=seed, dtype=dtype), outdir, shards
        )


def hub_config(config: dict[str, Any], special: dict[str, int]) -> dict[str, Any]:
    """A transformers 5 Qwen2.5-VL ``config.json`` dict in the published (flat) form.

    ``special``: the tokenizer's special tokens and their ids (for ``vision_token_id``, the id of
    ``<|vision_pad|>``, which the published configs carry)."""
    text = dict(config["text_config"])
    rope = dict(text["rope_parameters"])
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"the published layout has M-RoPE only; this config has {rope}")
    flat: dict[str, Any] = {"architectures": config["architectures"]}
    flat.update({key: value for key, value in text.items() if key not in _TEXT_KEYS_NOT_WRITTEN})
    vision = config["vision_config"]
    hub_vision = {key: vision[_VISION_SOURCES.get(key, key)] for key in _VISION_KEYS}
    flat.update(
        {
            "model_type": config["model_type"],
            "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]},
            "tie_word_embeddings": config["tie_word_embeddings"],
            "torch_dtype": config["dtype"],
            "transformers_version": PUBLISHED_TRANSFORMERS_VERSION,
            "vision_config": hub_vision,
            "vision_start_token_id": config["vision_start_token_id"],
            "vision_end_token_id": config["vision_end_token_id"],
            "vision_token_id": special["<|vision_pad|>"],
            "image_token_id": config["image_token_id"],
            "video_token_id": config["video_token_id"],
        }
    )
    return flat


def hub_preprocessor_config(image_processor: dict[str, Any]) -> dict[str, Any]:
    """The published ``preprocessor_config.json`` for a transformers 5 image processor dict
    (``processor_config.json``'s ``image_processor``): the pixel range as ``min_pixels`` /
    ``max_pixels``."""
    return {
        "min_pixels": image_processor["size"]["shortest_edge"],
        "max_pixels": image_processor["size"]["longest_edge"],
        "patch_size": image_processor["patch_size"],
        "temporal_patch_size": image_processor["temporal_patch_size"],
        "merge_size": image_processor["merge_size"],
        "image_mean": image_processor["image_mean"],
        "image_std": image_processor["image_std"],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }


def _read_weights(src: Path) -> Iterator[tuple[str, torch.Tensor]]:
    index = src / "model.safetensors.index.json"
    files = sorted(set(_read_json(index)["weight_map"].values())) if index.exists() else ["model.safetensors"]
    for file in files:
        with safe_open(src / file, framework="pt") as reader:
            for name in reader.keys():  # noqa: SIM118  # safe_open has no __iter__
                yield name, reader.get_tensor(name)


def _write_shards(tensors: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    names = sorted(tensors)
    if not 1 <= shards <= len(names):
        raise ValueError(f"shards must be between 1 and the number of tensors ({len(names)}), not {shards}")
    sizes = [tensors[name].numel() * tensors[name].element_size() for name in names]
    total = sum(sizes)
    groups: list[list[str]] = [[]]
    done = 0
    for position, (name, size) in enumerate(zip(names, sizes, strict=True)):
        to_open = shards - len(groups)
        # A new shard where this tensor's middle passes the current shard's share of the bytes,
        # or where each shard still to open needs one of the tensors left.
        past_share = 2 * done + size > 2 * total * len(groups) / shards
        if groups[-1] and to_open and (past_share or len(names) - position == to_open):
            groups.append([])
        groups[-1].append(name)
        done += size
    weight_map: dict[str, str] = {}
    for number, group in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-{shards:05d}.safetensors"
        save_file({name: tensors[name].contiguous() for name in group}, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    text = config["text_config"]
    return {
        "bos_token_id": text["bos_token_id"],
        "pad_token_id": text["pad_token_id"],
        "eos_token_id": text["eos_token_id"],
        "transformers_version": PUBLISHED_TRANSFORMERS_VERSION,
    }


def _write_tokenizer(src: Path, out: Path, tokenizer: dict[str, Any], template: str) -> None:
    shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
    bpe = tokenizer["model"]
    if bpe.get("type") != "BPE":
        raise ValueError(f"expected a BPE tokenizer, found {bpe.get('type')!r}")
    _write_json(out / "vocab.json", bpe["vocab"])
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in bpe["merges"]]
    (out / "merges.txt").write_text("".join(f"{line}\n" for line in ["#version: 0.2", *merges]), encoding="utf-8")
    settings = _read_json(src / "tokenizer_config.json")
    added = tokenizer.get("added_tokens", [])
    _write_json(
        out / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": {
                str(token["id"]): {
                    key: token[key] for key in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
                }
                for token in added
            },
            "additional_special_tokens": [
                token["content"] for token in added if token["special"] and token["content"] != "<|endoftext|>"
            ],
            "bos_token": None,
            "chat_template": template,
            "clean_up_tokenization_spaces": False,
            "eos_token": settings["eos_token"],
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": settings["pad_token"],
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
