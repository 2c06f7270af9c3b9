"""Build a random-weight Qwen2.5-VL checkpoint offline, for tests, demos and benchmarks.

The checkpoint is a real one: ``config.json`` + safetensors weights, a byte-level BPE tokenizer
carrying the real special tokens, the real Qwen2.5-VL chat template, the real image and video
processors. It reloads with ``AutoProcessor`` / ``AutoModelForImageTextToText`` like any hub model.

The default ("tiny") shape keeps what matters for fidelity: spatial merge 2, a 112 px attention
window (so a 224 px image spans 2x2 windows), full-attention blocks between windowed ones, and
M-RoPE in the language model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

log = logging.getLogger(__name__)

# The model name that resolves to a tiny checkpoint built (once, cached) on this machine.
TINY_MODEL_NAME = "tiny-random"

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The chat template shipped with Qwen/Qwen2.5-VL-*-Instruct.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinyShape:
    """Sizes of a random-weight checkpoint. The defaults build in well under a second."""

    vision_depth: int = 4
    vision_hidden: int = 64
    vision_heads: int = 4
    vision_intermediate: int = 128
    fullatt_blocks: tuple[int, ...] = (1, 3)
    text_layers: int = 2
    text_hidden: int = 64
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    # None: just the tokenizer's tokens. Benchmarks use the real vocabulary size, so that the
    # vocabulary projection (lm_head) costs what it costs in the released models.
    vocab_size: int | None = None


# A CPU benchmark shape: one 448x448 image takes a fraction of a second, and the work keeps the
# 7B model's proportions (FLOPs per 448x448 image: vision tower ~30 %, vocabulary projection
# ~6 %, the rest the LM body), so ratios measured with it carry over. The vocabulary is scaled
# down with the hidden size to keep the lm_head share.
BENCH_SHAPE = TinyShape(
    vision_depth=6,
    vision_hidden=256,
    vision_heads=4,
    vision_intermediate=512,
    fullatt_blocks=(2, 5),
    text_layers=10,
    text_hidden=512,
    text_heads=8,
    text_kv_heads=2,
    text_intermediate=1536,
    mrope_section=(8, 12, 12),
    vocab_size=5120,
)

# The Qwen2.5-VL-7B architecture (random weights; build it on the GPU in bf16).
QWEN25VL_7B_SHAPE = TinyShape(
    vision_depth=32,
    vision_hidden=1280,
    vision_heads=16,
    vision_intermediate=3420,
    fullatt_blocks=(7, 15, 23, 31),
    text_layers=28,
    text_hidden=3584,
    text_heads=28,
    text_kv_heads=4,
    text_intermediate=18944,
    mrope_section=(16, 24, 24),
    vocab_size=152064,
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus the Qwen special tokens."""
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(sorted(byte_alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS),
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return tokenizer


def build_processor() -> Qwen2_5_VLProcessor:
    """The real Qwen2.5-VL processor classes around :func:`build_tokenizer`, with the chat template."""
    return Qwen2_5_VLProcessor(
        # The released checkpoints' pixel limits (their preprocessor_config.json).
        image_processor=Qwen2VLImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}),
        tokenizer=build_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer: PreTrainedTokenizerFast, shape: TinyShape) -> Qwen2_5_VLConfig:
    ids = {token: int(tokenizer.convert_tokens_to_ids(token)) for token in SPECIAL_TOKENS}  # type: ignore[arg-type]
    text_head_dim = shape.text_hidden // shape.text_heads
    if sum(shape.mrope_section) * 2 != text_head_dim:
        raise ValueError(f"sum(mrope_section) must be text head_dim / 2 = {text_head_dim // 2}")
    return Qwen2_5_VLConfig(
        vision_config={
            "depth": shape.vision_depth,
            "hidden_size": shape.vision_hidden,
            "num_heads": shape.vision_heads,
            "intermediate_size": shape.vision_intermediate,
            "out_hidden_size": shape.text_hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": list(shape.fullatt_blocks),
        },
        text_config={
            "vocab_size": shape.vocab_size or len(tokenizer),
            "hidden_size": shape.text_hidden,
            "intermediate_size": shape.text_intermediate,
            "num_hidden_layers": shape.text_layers,
            "num_attention_heads": shape.text_heads,
            "num_key_value_heads": shape.text_kv_heads,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": list(shape.mrope_section),
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_tiny_model(
    outdir: str | Path,
    shape: TinyShape = TinyShape(),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Path:
    """Write a random-weight Qwen2.5-VL checkpoint to ``outdir`` and return its path.

    Deterministic for a given ``seed`` and ``shape`` on one machine.
    """
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    processor = build_processor()
    config = build_config(processor.tokenizer, shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)  # type: ignore[arg-type]  # transformers' wrapped .to
    model.save_pretrained(out)
    processor.save_pretrained(out)
    log.info("built random-weight Qwen2.5-VL at %s", out)
    return out
