"""Undo the vision tower's attention-window permutation.

Qwen2.5-VL's vision tower reorders merge units (groups of ``spatial_merge_size**2`` consecutive
patches) into attention-window order before its blocks and restores image order only after the
PatchMerger. Anything captured between (block outputs, the merger's input) is in window order;
these helpers put it back in the processor's patch order.
"""

from __future__ import annotations

from typing import Any

import torch


def window_index(visual: Any, grid_thw: torch.Tensor) -> torch.Tensor:
    """The merge-unit permutation the vision tower applies for ``grid_thw`` (global over images)."""
    try:  # transformers >= 5.24
        from transformers.vision_utils import get_vision_window_index
    except ImportError:  # transformers 5.17 - 5.23
        index, _ = visual.get_window_index(grid_thw)
    else:
        index, _ = get_vision_window_index(
            grid_thw,
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
    return torch.as_tensor(index)


def to_image_order(tokens: torch.Tensor, index: torch.Tensor, merge_unit: int) -> torch.Tensor:
    """Reorder window-ordered pre-merger ``tokens`` [Np, C] into image (patch) order [Np, C]."""
    channels = tokens.shape[-1]
    grouped = tokens.reshape(-1, merge_unit, channels)
    return grouped[torch.argsort(index.to(tokens.device))].reshape(-1, channels)
