"""The channels-last fp32 patch embedding equals transformers' convolution bit for bit, and is
installed only where it applies. End to end, ``test_fidelity.py`` compares every capture point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForImageTextToText

from qwen25vl_embed_server.core import patch_embed
from qwen25vl_embed_server.core.extractor import Extractor


def _stock(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval()


@pytest.mark.parametrize("patches", [1, 17, 4096])
def test_it_equals_transformers_patch_embedding(tiny_model_path: Path, patches: int) -> None:
    stock, ours = _stock(tiny_model_path), _stock(tiny_model_path)
    assert patch_embed.install(ours.model.visual)
    rows = torch.randn(patches, stock.model.visual.patch_embed.proj.weight[0].numel())
    with torch.inference_mode():
        expected = stock.model.visual.patch_embed(rows)
        got = ours.model.visual.patch_embed(rows)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_loaded_fp32_cpu_models_get_it(extractor: Extractor) -> None:
    embed = extractor.loaded.visual.patch_embed
    assert "forward" in vars(embed)
    assert embed.proj.weight.is_contiguous(memory_format=torch.channels_last_3d)


def test_bf16_keeps_transformers_own(tiny_model_path: Path) -> None:
    model = _stock(tiny_model_path, torch.bfloat16)
    assert not patch_embed.install(model.model.visual)
    assert "forward" not in vars(model.model.visual.patch_embed)


def test_a_layout_that_differs_is_not_installed(tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The load-time check compares bits: a result one float step off keeps transformers' forward
    and the weight's layout."""
    forward = patch_embed.forward

    def off_by_one_step(module: Any, hidden_states: torch.Tensor) -> torch.Tensor:
        out = forward(module, hidden_states)
        return torch.nextafter(out, torch.full_like(out, float("inf")))

    monkeypatch.setattr(patch_embed, "forward", off_by_one_step)
    model = _stock(tiny_model_path)
    assert not patch_embed.install(model.model.visual)
    embed = model.model.visual.patch_embed
    assert "forward" not in vars(embed)
    assert embed.proj.weight.is_contiguous()
