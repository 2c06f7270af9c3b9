"""Random-weight ColQwen2.5 / BiQwen2.5 checkpoints in the layouts they are published and trained in.

Built with colpali-engine's own model and processor classes and peft, as the published folders
were, on the tiny Qwen2.5-VL shape. The LoRA factors are random and nonzero (peft's B starts at
zero, which would hide an adapter that does not load), so every output depends on the adapter.

Layouts (what :func:`build_layout` writes; the folder a server is pointed at is ``Built.serve``):

- ``adapter``: transformers 5's ``save_pretrained``: a base folder (the model class's config,
  the processor) and an adapter folder holding the adapter alone;
- ``merged``: the adapter merged into the base and saved as one checkpoint, with colpali's processor;
- ``older-names``: the weights under Qwen2.5-VL's older names (``model.layers...`` in the base,
  ``base_model.model.model.layers...`` in the adapter), a flat ``config.json`` and processor files in
  the older form (``preprocessor_config.json`` naming colpali's processor class), as vidore's
  published ColQwen2.5 stores them;
- ``trainer``: an adapter folder as colpali-engine's trainer saves it (``model.save_pretrained`` +
  ``processor.save_pretrained``): processor files naming ``ColQwen2_5_Processor`` /
  ``BiQwen2_5_Processor``, with a pixel range of the adapter's own (smaller than the base's);
- ``bi-from-col`` (BiQwen2.5 only): BiQwen2.5 trained as colpali-engine's script trains it, from
  the ColQwen2.5 base (config naming ``ColQwen2_5``, head weights in it), saved as ``trainer``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from colpali_engine.models import BiQwen2_5, BiQwen2_5_Processor, ColQwen2_5, ColQwen2_5_Processor
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from qwen25vl_embed_server.core.fixtures.tiny_model import TinyShape, build_config, build_processor
from qwen25vl_embed_server.core.fixtures.tiny_retrieval import TARGET_MODULES

LAYOUTS = {
    "colqwen2.5": ("adapter", "merged", "older-names", "trainer"),
    "biqwen2.5": ("adapter", "merged", "older-names", "trainer", "bi-from-col"),
}
TRAINER_MAX_PIXELS = 28 * 28 * 32
"""The ``trainer`` layouts' own largest image (colpali's ``max_num_visual_tokens=32``): a 224 x 224
image is resized below it, so the adapter's range shows in the token count."""

# What the older names were (the inverse of colpali-engine's renames on load).
_OLDER_NAMES = (("language_model.", "model."), ("base_model.model.language_model.", "base_model.model.model."))


@dataclass(frozen=True)
class Built:
    """A layout on disk: ``serve`` the folder to load, ``processor`` where its processor files are."""

    serve: Path
    processor: Path


def build_layout(out: Path, kind: str, layout: str, seed: int = 0) -> Built:
    """Write ``layout`` of ``kind`` ("colqwen2.5" | "biqwen2.5") under ``out``."""
    col = kind == "colqwen2.5"
    model_class: Any = ColQwen2_5 if col else BiQwen2_5
    processor_class: Any = ColQwen2_5_Processor if col else BiQwen2_5_Processor
    plain = build_processor()
    config = build_config(plain.tokenizer, TinyShape())
    base, adapter = out / "base", out / "adapter"
    torch.manual_seed(seed)
    if layout == "bi-from-col":
        ColQwen2_5(config).save_pretrained(base)
        _colpali_processor(ColQwen2_5_Processor, plain).save_pretrained(base)
        body = BiQwen2_5.from_pretrained(str(base), key_mapping={})  # the head is not BiQwen2.5's: left out
    else:
        body = model_class(config)
        body.save_pretrained(base)
        plain.save_pretrained(base)
    model = _random_lora(body, TARGET_MODULES[kind], str(base.resolve()))

    if layout == "merged":
        merged = out / "merged"
        model.merge_and_unload().save_pretrained(merged)
        _colpali_processor(processor_class, plain).save_pretrained(merged)
        return Built(serve=merged, processor=merged)
    model.save_pretrained(str(adapter))
    if layout == "adapter":
        return Built(serve=adapter, processor=base)
    if layout in ("trainer", "bi-from-col"):
        processor = _colpali_processor(BiQwen2_5_Processor if layout == "bi-from-col" else processor_class, plain)
        processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": TRAINER_MAX_PIXELS}
        processor.save_pretrained(adapter)
        return Built(serve=adapter, processor=adapter)
    assert layout == "older-names", layout
    _rename_keys(base / "model.safetensors")
    _rename_keys(adapter / "adapter_model.safetensors")
    _flatten_config(base / "config.json")
    _older_processor_files(plain, processor_class.__name__, adapter)
    return Built(serve=adapter, processor=adapter)


def _random_lora(body: Any, targets: str, base: str) -> Any:
    """``body`` with a LoRA adapter (vidore's settings, small rank) whose factors are all random."""
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=targets,
        init_lora_weights="gaussian",
        task_type="FEATURE_EXTRACTION",
    )
    with warnings.catch_warnings():  # peft asks for a property transformers 5 deprecates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model = get_peft_model(body, lora)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    model.peft_config["default"].base_model_name_or_path = base
    return model


def _colpali_processor(cls: Any, plain: Any) -> Any:
    return cls(
        image_processor=plain.image_processor,
        tokenizer=plain.tokenizer,
        video_processor=plain.video_processor,
        chat_template=plain.chat_template,
    )


def _rename_keys(path: Path) -> None:
    """The file's tensors under the older names."""
    renamed = {}
    for key, tensor in load_file(str(path)).items():
        for new, old in _OLDER_NAMES:
            if key.startswith(new):
                key = old + key.removeprefix(new)
                break
        renamed[key] = tensor
    save_file(renamed, str(path), metadata={"format": "pt"})


def _flatten_config(path: Path) -> None:
    """config.json as transformers 4 wrote it for Qwen2.5-VL: the text settings at the top level."""
    config = json.loads(path.read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    text["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    text["rope_theta"] = rope["rope_theta"]
    for key, value in text.items():
        config.setdefault(key, value)
    path.write_text(json.dumps(config, indent=2))


def _older_processor_files(plain: Any, processor_class: str, folder: Path) -> None:
    """Processor files as transformers 4 wrote them: ``preprocessor_config.json`` (the image
    processor's settings) and the tokenizer's files, each naming the processor class, and
    ``chat_template.json``."""
    plain.image_processor.save_pretrained(folder)
    plain.tokenizer.save_pretrained(folder)
    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        settings = json.loads((folder / name).read_text())
        settings["processor_class"] = processor_class
        (folder / name).write_text(json.dumps(settings, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": plain.chat_template}, indent=2))
