"""The vision tower's float32 patch embedding on channels-last data: the same convolution, faster.

transformers runs the patch embedding as a Conv3d over [patches, 3, 2, 14, 14] (channels first).
oneDNN, which runs it on the CPU, then lays out three channels in blocks of 16, which costs more
than the convolution's own work. Given the input (and weight) channels last, the same oneDNN
convolution skips that and sums each patch in the same order: 62 -> 43 ms for 4096 patches here,
with the same bits. That the bits are the same is oneDNN's choice, not a law, so :func:`install`
checks it on this machine first, as :mod:`~.vision_attention` does. bf16 is left alone: its
convolution is slower channels last.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def forward(patch_embed: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """``Qwen2_5_VisionPatchEmbed.forward`` with the patches laid out channels last."""
    conv = patch_embed.proj
    patches = hidden_states.view(-1, patch_embed.in_channels, *conv.kernel_size).to(conv.weight.dtype)
    out: torch.Tensor = conv(patches.contiguous(memory_format=torch.channels_last_3d))
    return out.view(-1, patch_embed.embed_dim)


def install(visual: Any) -> bool:
    """Give ``visual``'s float32 CPU patch embedding :func:`forward` (and its weight channels last)
    if that gives the same bits here; returns whether it did."""
    patch_embed = getattr(visual, "patch_embed", None)
    conv = getattr(patch_embed, "proj", None)
    if not isinstance(conv, torch.nn.Conv3d):  # e.g. already a packed matmul (fp32_matmul="onednn")
        return _not_installed("the patch embedding is not a Conv3d")
    if conv.weight.device.type != "cpu" or conv.weight.dtype != torch.float32:
        return _not_installed(f"the weights are {conv.weight.dtype} on {conv.weight.device.type}")
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(300, conv.weight[0].numel(), generator=generator)
    with torch.inference_mode():
        expected = type(patch_embed).forward(patch_embed, sample)
        original = conv.weight.data
        conv.weight.data = original.contiguous(memory_format=torch.channels_last_3d)
        same = torch.equal(forward(patch_embed, sample), expected)
    if not same:
        conv.weight.data = original
        return _not_installed("channels last differs from transformers' on this machine")
    patch_embed.forward = functools.partial(forward, patch_embed)
    log.info("patch embedding: channels last")
    return True


def _not_installed(reason: str) -> bool:
    log.info("patch embedding: transformers' own (%s)", reason)
    return False
