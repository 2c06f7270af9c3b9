"""Build random-weight ColQwen2.5 / BiQwen2.5 checkpoints offline, in the published layout.

``<out>/base``: the base checkpoint (a ``Qwen2_5_VLModel`` body, plus ``custom_text_proj`` for
ColQwen2.5; ``config.json`` names ``ColQwen2_5`` / ``BiQwen2_5``) with the processor.
``<out>/adapter``: a PEFT LoRA adapter on it (``adapter_config.json`` naming the base by path,
``adapter_model.safetensors``) with the processor, as the published adapters carry it. The LoRA
targets are the published ones (the language model's projections and, for ColQwen2.5, the head);
both LoRA factors are random (not peft's zero B), so the adapter changes every output.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from transformers import Qwen2_5_VLModel

from qwen25vl_embed_server.core.retrieval_model import HeadedQwen2_5_VLModel
from qwen25vl_embed_server.core.tiny_model import TinyShape, build_config, build_processor

# vidore/colqwen2.5-v0.2's adapter_config.json target_modules (the vision tower is left alone).
_LM_TARGETS = r".*(model)(?!.*visual).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$"
TARGET_MODULES = {
    "colqwen2.5": rf"({_LM_TARGETS}|.*(custom_text_proj).*$)",
    "biqwen2.5": _LM_TARGETS,
}
ARCHITECTURES = {"colqwen2.5": "ColQwen2_5", "biqwen2.5": "BiQwen2_5"}


def build_tiny_retrieval(outdir: str | Path, kind: str, shape: TinyShape | None = None, seed: int = 0) -> Path:
    """Write ``<outdir>/base`` and ``<outdir>/adapter`` for ``kind`` ("colqwen2.5" | "biqwen2.5");
    return the adapter folder (what a server is pointed at)."""
    from peft import LoraConfig, get_peft_model

    out = Path(outdir)
    base, adapter = out / "base", out / "adapter"
    processor = build_processor()
    config = build_config(processor.tokenizer, shape or TinyShape())
    torch.manual_seed(seed)
    body = HeadedQwen2_5_VLModel(config) if kind == "colqwen2.5" else Qwen2_5_VLModel(config)
    body.save_pretrained(base)
    # save_pretrained writes the class's own name; the published configs name colpali's class.
    config_file = base / "config.json"
    written = json.loads(config_file.read_text())
    written["architectures"] = [ARCHITECTURES[kind]]
    config_file.write_text(json.dumps(written, indent=2))
    processor.save_pretrained(base)

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGET_MODULES[kind], init_lora_weights=False)
    with warnings.catch_warnings():  # peft asks for a property transformers 5 deprecates: not the caller's
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        peft_model = get_peft_model(body, lora)
    peft_model.peft_config["default"].base_model_name_or_path = str(base.resolve())
    peft_model.save_pretrained(str(adapter))
    processor.save_pretrained(adapter)
    return adapter
