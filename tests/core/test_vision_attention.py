"""The vision tower's batched attention forward equals transformers' bit for bit, and is installed
only where it applies.

End to end, every capture point through the server is compared with a stock transformers model in
``test_fidelity.py`` (fp32) and ``test_packed_linear.py`` (bf16); these tests check the pieces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

from qwen25vl_embed_server.core.cpu import vision_attention
from qwen25vl_embed_server.core.model.extractor import Extractor

from ..helpers import noise_image


def _stock(path: Path, dtype: torch.dtype = torch.float32, attn: str = "sdpa") -> Any:
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_equals_transformers_rotary_bit_for_bit(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(300, 3, 4, 32, generator=generator).to(dtype)  # strided views, as in the block
    angles = torch.rand(300, 16, generator=generator) * 50
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    query, key = modeling_qwen2_5_vl.apply_rotary_pos_emb_vision(qkv[:, 0], qkv[:, 1], cos, sin)
    ours = vision_attention.rotary(qkv[:, :2], cos[:, None, None, :], sin[:, None, None, :])
    assert ours.dtype == dtype
    assert torch.equal(ours[:, 0], query)
    assert torch.equal(ours[:, 1], key)


def test_equal_runs_keeps_order_and_counts() -> None:
    assert vision_attention.equal_runs([64, 64, 48, 64, 64, 64]) == [(2, 64), (1, 48), (3, 64)]
    assert vision_attention.equal_runs([7]) == [(1, 7)]
    assert vision_attention.equal_runs([]) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_tower_equals_transformers_on_mixed_windows(tiny_model_path: Path, dtype: torch.dtype) -> None:
    """Whole vision towers, ours installed and stock, on images whose edge windows are shorter."""
    stock, ours = _stock(tiny_model_path, dtype), _stock(tiny_model_path, dtype)
    assert vision_attention.install(ours.model.visual)
    processor_inputs = AutoProcessor.from_pretrained(tiny_model_path).image_processor(
        images=[noise_image(300, 200), noise_image(448, 448, seed=1), noise_image(1000, 60, seed=2)],
        return_tensors="pt",
    )
    pixels, grid = processor_inputs["pixel_values"].to(dtype), processor_inputs["image_grid_thw"]
    with torch.inference_mode():
        expected = stock.model.visual(pixels, grid_thw=grid, output_hidden_states=True)
        got = ours.model.visual(pixels, grid_thw=grid, output_hidden_states=True)
    assert torch.equal(got.pooler_output, expected.pooler_output)
    for block_got, block_expected in zip(got.hidden_states, expected.hidden_states, strict=True):
        assert torch.equal(block_got, block_expected)


def test_windows_of_one_length_share_one_attention_call(tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _stock(tiny_model_path)
    assert vision_attention.install(model.model.visual)
    calls: list[tuple[int, ...]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(tuple(query.shape))
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    attention = model.model.visual.blocks[0].attn
    hidden = torch.randn(64 * 5 + 16, attention.proj.out_features)
    cu_seqlens = torch.tensor([0, 64, 128, 144, 208, 272, 336], dtype=torch.int32)
    embedding = torch.rand(hidden.shape[0], attention.qkv.out_features // 3 // attention.num_heads)
    with torch.inference_mode():
        attention(hidden, cu_seqlens=cu_seqlens, position_embeddings=(embedding.cos(), embedding.sin()))
    heads, head_dim = attention.num_heads, embedding.shape[-1]
    assert calls == [(2, heads, 64, head_dim), (1, heads, 16, head_dim), (3, heads, 64, head_dim)]


def test_loaded_cpu_models_get_it(extractor: Extractor) -> None:
    for block in extractor.loaded.visual.blocks:
        assert "forward" in vars(block.attn), "the block runs transformers' forward"


def test_other_attention_implementations_keep_their_own(tiny_model_path: Path) -> None:
    model = _stock(tiny_model_path, attn="eager")
    assert not vision_attention.install(model.model.visual)
    assert all("forward" not in vars(block.attn) for block in model.model.visual.blocks)


def test_a_forward_that_differs_is_not_installed(tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The load-time check compares bits: a rotary one float step off keeps transformers' forward."""
    rotary = vision_attention.rotary

    def off_by_one_step(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        out = rotary(x, cos, sin)
        return torch.nextafter(out, torch.full_like(out, float("inf")))

    monkeypatch.setattr(vision_attention, "rotary", off_by_one_step)
    model = _stock(tiny_model_path)
    assert not vision_attention.install(model.model.visual)
    assert all("forward" not in vars(block.attn) for block in model.model.visual.blocks)
