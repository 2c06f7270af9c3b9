"""Load a Qwen2.5-VL retrieval model as published: base + PEFT LoRA adapter (merged at load) + head.

Where the parts are and which recipe they have: :mod:`.layout`. The module names are
those of colpali-engine's ``ColQwen2_5`` / ``BiQwen2_5`` (a ``Qwen2_5_VLModel``, with a
``custom_text_proj`` beside ``visual`` and ``language_model`` for ColQwen2.5). Weights and
adapter keys stored under Qwen2.5-VL's older names (``model.layers...``, as vidore's checkpoints
store them) are renamed on load with colpali-engine's own mapping (:data:`COLPALI_KEY_MAPPING`).
Every file set is checked against the model (:mod:`.load_report`).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, cast

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2_5_VLProcessor

from qwen25vl_embed_server.core.model.load_report import WeightCheck, one_line_reports, require_complete
from qwen25vl_embed_server.core.retrieval.layout import HEAD_MODULE, RetrievalLayout
from qwen25vl_embed_server.core.retrieval.recipes import Recipe

log = logging.getLogger(__name__)

HEAD_DIM = 128
"""ColQwen2.5's custom_text_proj output size (fixed in the reference)."""

COLPALI_KEY_MAPPING: dict[str, str] = {
    r"^base_model\.model\.custom_text_proj": "custom_text_proj",
    r"^model\.layers": "language_model.layers",
    r"^model\.embed_tokens": "language_model.embed_tokens",
    r"^model\.norm": "language_model.norm",
}
"""colpali-engine 0.3.18's ``ColQwen2_5._checkpoint_conversion_mapping``: checkpoint key (regex)
-> module name, applied to the base's weights (transformers' ``key_mapping``) and to the
adapter's keys (peft's ``key_mapping``, after its ``base_model.model.`` prefix)."""


class _RetrievalBody(Qwen2_5_VLModel):
    """A ``Qwen2_5_VLModel`` that reads colpali-engine's checkpoints: the older key names are
    renamed; an ``lm_head`` in the file (a base saved with its language-model head) is not the
    retrieval model's and is left out, as colpali-engine's classes leave it."""

    _checkpoint_conversion_mapping = COLPALI_KEY_MAPPING
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]  # noqa: RUF012 - transformers' attribute


class HeadedQwen2_5_VLModel(_RetrievalBody):  # noqa: N801 - the transformers class name it extends
    """ColQwen2.5's parameters: the body plus ``custom_text_proj`` (Linear(hidden, 128), with bias),
    without its forward (the extractor applies the head; see :mod:`.heads`)."""

    def __init__(self, config: Qwen2_5_VLConfig) -> None:
        super().__init__(config)
        hidden_size = int(config.get_text_config().hidden_size)
        self.custom_text_proj = torch.nn.Linear(hidden_size, HEAD_DIM)
        self.post_init()


class PooledQwen2_5_VLModel(_RetrievalBody):  # noqa: N801 - the transformers class name it extends
    """BiQwen2.5's parameters: the body alone. A head in the base is left out: colpali-engine
    trains BiQwen2.5 from the ColQwen2.5 base, whose head BiQwen2.5 does not use."""

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\.", rf"^{HEAD_MODULE}\."]  # noqa: RUF012 - as above


class BodyHolder(torch.nn.Module):
    """What the extractor drives: ``.model`` the Qwen2.5-VL body, ``.config`` its config."""

    def __init__(self, body: Qwen2_5_VLModel) -> None:
        super().__init__()
        self.model = body
        self.config = body.config


def load_retrieval(
    layout: RetrievalLayout, recipe: Recipe, dtype: torch.dtype, device: torch.device, allow_partial: bool = False
) -> tuple[Any, Any, Any, tuple[WeightCheck, ...]]:
    """``(model, processor, head, checks)``: the body in a :class:`BodyHolder`, the adapter merged,
    on ``device``; ``head`` the body's ``custom_text_proj`` (None for a recipe without one);
    ``checks`` the base's and the adapter's weights against the model.

    The processor is Qwen2.5-VL's, with the processor folder's settings (its pixel range), whatever
    processor class its files name (colpali-engine's trainer names its own).

    Raises:
        ValueError: weights missing, unexpected or of another shape (one line), unless
            ``allow_partial``; an adapter that targets no module of the base (peft's message).
    """
    if recipe.tasks:  # jina-embeddings-v4: task LoRAs beside the base, nothing merged
        from qwen25vl_embed_server.core.retrieval.jina_model import load_jina

        return load_jina(layout.base, recipe, dtype, device, allow_partial)
    cls = HeadedQwen2_5_VLModel if recipe.head else PooledQwen2_5_VLModel
    with one_line_reports():
        loaded = cls.from_pretrained(
            layout.base, dtype=dtype, key_mapping=cls._checkpoint_conversion_mapping, output_loading_info=True
        )
    body, info = cast("tuple[Any, dict[str, Any]]", loaded)
    checks = [WeightCheck.of_checkpoint(layout.base, body, info)]
    require_complete(checks[0], allow_partial)
    if layout.adapter is not None:
        body, adapter_check = _merge_adapter(body, layout.adapter, cls._checkpoint_conversion_mapping)
        checks.append(adapter_check)
        require_complete(adapter_check, allow_partial)
        log.info("merged LoRA adapter %s into %s", layout.adapter, layout.base)
    holder = BodyHolder(body).to(device).eval()
    processor = Qwen2_5_VLProcessor.from_pretrained(layout.processor)
    return holder, processor, body.custom_text_proj if recipe.head else None, tuple(checks)


def _merge_adapter(body: Qwen2_5_VLModel, adapter: str, key_mapping: dict[str, str]) -> tuple[Any, WeightCheck]:
    """The body with the adapter merged in (once, at load: the served forward is the base
    architecture's, at its speed), and the adapter's weights against the LoRA modules."""
    from peft import PeftConfig, PeftModel, get_peft_model_state_dict

    config = PeftConfig.from_pretrained(adapter)
    config.inference_mode = True
    # PeftModel.from_pretrained's two steps, keeping the load result it drops.
    with warnings.catch_warnings():  # peft asks for a property transformers 5 deprecates: not the caller's
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model = PeftModel(body, config)
    result = model.load_adapter(adapter, "default", torch_device="cpu", key_mapping=key_mapping)
    check = WeightCheck.of(
        "adapter",
        adapter,
        expected=len(get_peft_model_state_dict(model)),
        missing=result.missing_keys,
        unexpected=result.unexpected_keys,
    )
    return model.merge_and_unload(), check
