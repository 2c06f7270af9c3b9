"""An independent jina-embeddings-v4 reference, written from the published recipe (not the server's code).

transformers' Qwen2.5-VL with the base weights, each task a standard peft LoRA adapter
(``set_adapter``) on the language model and ``multi_vector_projector``, and the pooling as the
recipe states it: the single vector is the mean of the last hidden states over the image's vision
span (vision-start to vision-end token, inclusive) or over a text's attention mask, L2-normalised;
the multi-vector is the projector's output, each row L2-normalised. Texts are ``Query: <text>`` or
``Passage: <text>`` (the text-matching task: always ``Query:``); an image document is the recipe's
own prompt, without a system turn. Each request runs alone.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from safetensors import safe_open
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

TASKS = ("retrieval", "text-matching", "code")
DOCUMENT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"


class Reference:
    """transformers + peft, one adapter per task, the recipe's pooling (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation="sdpa"
        )
        hidden = model.config.get_text_config().hidden_size
        config = json.loads((path / "config.json").read_text())
        base = _tensors(path, "multi_vector_projector.")
        model.multi_vector_projector = torch.nn.Linear(hidden, config["multi_vector_projector_dim"])
        model.multi_vector_projector.load_state_dict({k.split(".")[-1]: v for k, v in base.items()})
        adapter = json.loads((path / "adapters" / "adapter_config.json").read_text())
        lora = LoraConfig(
            r=adapter["r"],
            lora_alpha=adapter["lora_alpha"],
            lora_dropout=0.0,
            target_modules=r".*language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj|multi_vector_projector",
        )
        with warnings.catch_warnings():  # peft asks for a property transformers 5 deprecates
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            peft_model = get_peft_model(model, lora, adapter_name=TASKS[0])
        for task in TASKS[1:]:
            peft_model.add_adapter(task, lora)
        parameters = dict(peft_model.named_parameters())
        with safe_open(str(path / "adapters" / "adapter_model.safetensors"), framework="pt") as opened:
            for key in opened.keys():  # noqa: SIM118
                # The published keys name transformers 4's modules (model.layers.N ...).
                name = key.replace("base_model.model.model.layers.", "base_model.model.model.language_model.layers.")
                with torch.no_grad():
                    parameters[name].copy_(opened.get_tensor(key))
        lora_parameters = [name for name in parameters if ".lora_" in name]
        assert len(lora_parameters) == len(opened_keys(path)), "every LoRA factor is the file's"
        self.model = peft_model.eval()
        self.processor = Qwen2_5_VLProcessor.from_pretrained(str(path), trust_remote_code=False)
        self.start = model.config.vision_start_token_id
        self.end = model.config.vision_end_token_id

    @torch.no_grad()
    def embed(self, task: str, image: Image.Image | None, text: str = "", passage: bool = False) -> dict[str, Any]:
        self.model.set_adapter(task)
        if image is not None:
            inputs = self.processor(text=[DOCUMENT], images=[image], return_tensors="pt")
        else:
            prefix = "Passage: " if passage and task != "text-matching" else "Query: "
            inputs = self.processor(text=[prefix + text], return_tensors="pt")
        hidden = self.model.base_model.model.model(**inputs, use_cache=False).last_hidden_state[0]
        ids = inputs["input_ids"][0]
        if image is not None:
            start, end = int((ids == self.start).nonzero()[0]), int((ids == self.end).nonzero()[-1])
            pooled = hidden[start : end + 1].mean(0)
        else:
            pooled = hidden[inputs["attention_mask"][0].bool()].mean(0)
        single = pooled / pooled.norm()
        multi = self.model.base_model.model.multi_vector_projector(hidden)
        multi = multi / multi.norm(dim=-1, keepdim=True)
        return {"single": single.numpy(), "multi": multi.numpy(), "text": self.processor.decode(ids)}


def _tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as opened:
            found |= {key: opened.get_tensor(key) for key in opened.keys() if key.startswith(prefix)}  # noqa: SIM118
    return found


def opened_keys(path: Path) -> list[str]:
    with safe_open(str(path / "adapters" / "adapter_model.safetensors"), framework="pt") as opened:
        return list(opened.keys())
