"""The patch embedding over a grid of patches equals transformers' bit for bit, and is installed only
where it applies and matches.

End to end, every capture point through the server is compared with a stock transformers model in
``test_fidelity.py`` (fp32) and ``test_packed_linear.py`` (bf16), with this forward installed as the
server loads it; these tests check the piece.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

from qwen25vl_embed_server.core.cpu import patch_embedding
from qwen25vl_embed_server.core.model.extractor import Extractor

from ..helpers import noise_image


def _stock(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval()


def _refused_here(visual: Any) -> bool:
    """On a CPU where oneDNN runs bf16 on AMX, transformers' own bits depend on the number of
    patches (:func:`patch_embedding.onednn_runs_amx_bf16`): there the forward is never installed,
    whatever its check would say, and transformers' stays. True where that is what this CPU does."""
    if patch_embedding.applies(visual.patch_embed) is None:
        return False
    assert visual.patch_embed.proj.weight.dtype == torch.bfloat16
    assert patch_embedding.onednn_runs_amx_bf16()
    assert not patch_embedding.install(visual)
    assert "forward" not in vars(visual.patch_embed)
    assert _sizes_where_the_grid_differs(visual.patch_embed), "the refusal's reason holds on this CPU"
    return True


def _sizes_where_the_grid_differs(patch_embed: Any) -> list[int]:
    """Patch counts from 1 to 200 where the grid's bits differ from transformers' forward."""
    features = patch_embed.proj.weight[0].numel()
    differ = []
    with torch.inference_mode():
        for rows in range(1, 201):
            hidden = torch.randn(rows, features, generator=torch.Generator().manual_seed(rows)) * 3
            if not torch.equal(patch_embed(hidden), patch_embedding.forward(patch_embed, hidden)):
                differ.append(rows)
    return differ


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4, 63, 64, 65, 4 * 64, 1024 + 36, 4096, 2 * 4096 + 100])
def test_forward_equals_transformers_bit_for_bit(tiny_model_path: Path, dtype: torch.dtype, rows: int) -> None:
    """Full lines, a short last line, fewer rows than a line, one row, the largest call and several
    calls; float32 rows as the processor hands them over, cast to the model's dtype on the way."""
    visual = _stock(tiny_model_path, dtype).model.visual
    patch_embed = visual.patch_embed
    if _refused_here(visual):
        return
    features = patch_embed.proj.weight[0].numel()
    hidden = torch.randn(rows, features, generator=torch.Generator().manual_seed(rows)) * 3
    with torch.inference_mode():
        expected = patch_embed(hidden)
        got = patch_embedding.forward(patch_embed, hidden)
    assert got.dtype == expected.dtype == dtype
    assert got.shape == expected.shape == (rows, patch_embed.embed_dim)
    assert got.is_contiguous()
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_largest_call_at_the_7b_width_equals_transformers(dtype: torch.dtype) -> None:
    """The 7B's embedding width (1,280) over a full call: there oneDNN configures its bf16 kernel with
    another data layout than for a few lines (seen with ONEDNN_VERBOSE), and the bits stay."""
    patch_embed = modeling_qwen2_5_vl.Qwen2_5_VisionPatchEmbed(14, 2, 3, 1280).to(dtype).eval()
    if _refused_here(nn.ModuleDict({"patch_embed": patch_embed})):
        return
    rows = patch_embedding.LINES * patch_embedding.WIDTH
    hidden = torch.randn(rows, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(patch_embedding.forward(patch_embed, hidden), patch_embed(hidden))


def test_the_tower_equals_transformers_on_mixed_sizes(tiny_model_path: Path) -> None:
    stock, ours = _stock(tiny_model_path), _stock(tiny_model_path)
    assert patch_embedding.install(ours.model.visual)
    pixels = AutoProcessor.from_pretrained(tiny_model_path).image_processor(
        images=[noise_image(300, 200), noise_image(448, 448, seed=1), noise_image(1000, 60, seed=2)],
        return_tensors="pt",
    )
    with torch.inference_mode():
        expected = stock.model.visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"])
        got = ours.model.visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"])
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(got.pooler_output, expected.pooler_output)


def test_many_patches_run_as_several_calls_of_at_most_the_checked_size(
    tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    patch_embed = _stock(tiny_model_path).model.visual.patch_embed
    shapes: list[tuple[int, ...]] = []
    convolution = patch_embed.proj.forward

    def recording(grid: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(grid.shape))
        out: torch.Tensor = convolution(grid)
        return out

    monkeypatch.setattr(patch_embed.proj, "forward", recording)
    largest = patch_embedding.LINES * patch_embedding.WIDTH
    features = patch_embed.proj.weight[0].numel()
    with torch.inference_mode():
        patch_embedding.forward(patch_embed, torch.randn(2 * largest + 5, features))
    channels, (temporal, height, width) = patch_embed.proj.in_channels, patch_embed.proj.kernel_size
    full = (1, channels, temporal, patch_embedding.LINES * height, patch_embedding.WIDTH * width)
    assert shapes == [full, full, (1, channels, temporal, height, 5 * width)]


def test_loaded_cpu_models_get_it(extractor: Extractor) -> None:
    assert "forward" in vars(extractor.loaded.visual.patch_embed), "the tower runs transformers' patch embedding"


def test_a_forward_that_differs_is_not_installed(tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The load-time check compares bits: a result one float step off keeps transformers' forward."""
    forward = patch_embedding.forward

    def off_by_one_step(patch_embed: Any, hidden_states: torch.Tensor) -> torch.Tensor:
        out = forward(patch_embed, hidden_states)
        return torch.nextafter(out, torch.full_like(out, float("inf")))

    monkeypatch.setattr(patch_embedding, "forward", off_by_one_step)
    visual = _stock(tiny_model_path).model.visual
    assert not patch_embedding.install(visual)
    assert "forward" not in vars(visual.patch_embed)


def test_models_off_the_cpu_keep_their_own(tiny_model_path: Path) -> None:
    visual = _stock(tiny_model_path).model.visual.to("meta")
    assert not patch_embedding.install(visual)
    assert "forward" not in vars(visual.patch_embed)
