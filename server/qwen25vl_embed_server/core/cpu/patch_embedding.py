"""The vision tower's patch embedding as one convolution over a grid of patches, bit-identical.

transformers' ``Qwen2_5_VisionPatchEmbed`` views its rows (one per patch: channels x temporal x
height x width pixels) as a batch of clips of one patch each and runs a ``Conv3d`` whose kernel
equals its stride: oneDNN gets thousands of convolutions with one output position each (4,096 for
four 448x448 images), and its direct kernel spends most of its time starting them.

:func:`forward` lays the same patches side by side in one clip, :data:`WIDTH` patches to a line,
and runs the module's own ``Conv3d`` on it once: the kernel still covers one patch per output
position, so every output is the same patch's dot product with the same weights, computed by the
same oneDNN kernel in the same order of summation, over more positions per call. The copy into
the grid also does the cast to the weights' dtype that transformers does apart. A line left short
at the end is padded with zeros, whose outputs are dropped. One call covers at most :data:`LINES`
lines; more patches run as several calls.

:func:`install` puts :func:`forward` on the patch embedding of CPU models, once a check on this
machine found its output equal, bit for bit, to transformers' forward on random rows (the kernel is
oneDNN's choice, not ours). oneDNN picks its kernel's configuration by the problem's size (in
bf16 it switches to another data layout above some tens of lines here), so the check runs the
largest call there can be, a full :data:`LINES`, beside smaller ones. Elsewhere, or if the check
fails, transformers' forward stays, and the log says why.

Not in bf16 where oneDNN runs AMX (:func:`onednn_runs_amx_bf16`): there transformers' own
convolution sums a patch in an order that depends on how many patches it is given (on a Sapphire
Rapids core, dozens of the patch counts from 1 to 200 give other bits than the grid, while a
random check can pass beside them), so no one grid can equal it at every size.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, TypeGuard

import torch
from torch import nn

log = logging.getLogger(__name__)

# Patches per line of the grid: enough output positions per line for oneDNN's kernel to run long rows.
WIDTH = 64
# Lines per convolution at most (4,096 patches: four 448x448 images), the largest call the load check runs.
LINES = 64


def is_patchwise(conv: object) -> TypeGuard[nn.Conv3d]:
    """Whether ``conv`` is a ``Conv3d`` whose kernel is its stride, unpadded: one output per patch."""
    return isinstance(conv, nn.Conv3d) and conv.kernel_size == conv.stride and conv.padding == (0, 0, 0)


def as_linear(patch_embed: Any) -> nn.Linear:
    """The patch embedding's Conv3d as the linear layer it is on the processor's rows (one per patch):
    the flattened kernel as the weight, in the kernel's dtype. Raises ValueError if not patch-wise."""
    conv = getattr(patch_embed, "proj", None)
    if not is_patchwise(conv):
        raise ValueError("the patch embedding is not a patch-wise projection")
    out_features, in_features = int(conv.out_channels), int(conv.weight[0].numel())
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.reshape(out_features, in_features))
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def forward(patch_embed: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """``Qwen2_5_VisionPatchEmbed.forward`` of ``patch_embed``: [rows, C*T*P*P] -> [rows, embed_dim]."""
    parts = hidden_states.split(WIDTH * LINES)
    if len(parts) == 1:
        return _grid(patch_embed, hidden_states)
    return torch.cat([_grid(patch_embed, part) for part in parts])


def _grid(patch_embed: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """One convolution over ``hidden_states``' patches, :data:`WIDTH` to a line (fewer rows: one line)."""
    proj: nn.Conv3d = patch_embed.proj
    channels = int(proj.in_channels)
    temporal, height, across = (int(size) for size in proj.kernel_size)
    rows = hidden_states.shape[0]
    width = max(1, min(WIDTH, rows))
    lines = -(-rows // width)
    clips = hidden_states.view(rows, channels, temporal, height, across)
    # The grid as the convolution reads it: [1, channels, temporal, lines x height, width x across].
    grid = torch.empty((channels, temporal, lines, height, width, across), dtype=proj.weight.dtype, device=clips.device)
    full = rows // width * width
    if full:
        grid[:, :, : full // width].copy_(clips[:full].unflatten(0, (-1, width)).permute(2, 3, 0, 4, 1, 5))
    if full < rows:
        last = grid[:, :, -1]  # [channels, temporal, height, width, across]
        last[:, :, :, rows - full :].zero_()
        last[:, :, :, : rows - full].copy_(clips[full:].permute(1, 2, 3, 0, 4))
    out: torch.Tensor = proj(grid.view(1, channels, temporal, lines * height, width * across))
    # [1, embed_dim, 1, lines, width] -> [rows, embed_dim], contiguous as transformers returns it.
    return out.view(proj.out_channels, lines * width)[:, :rows].t().contiguous()


def onednn_runs_amx_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions on AMX here: the CPU has AMX-BF16 and
    ``ONEDNN_MAX_CPU_ISA`` (or its older name ``DNNL_MAX_CPU_ISA``) does not cap oneDNN below it."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    return bool(capabilities.get("amx_bf16")) and (cap in ("ALL", "DEFAULT") or "AMX" in cap)


def applies(patch_embed: Any) -> str | None:
    """Why :func:`forward` cannot be given to ``patch_embed`` whatever the check finds, or None."""
    proj = getattr(patch_embed, "proj", None)
    if not is_patchwise(proj):
        return "it is not a patch-wise Conv3d"
    if proj.weight.device.type != "cpu":
        return f"the model is on {proj.weight.device.type}, not the CPU"
    if proj.weight.dtype == torch.bfloat16 and onednn_runs_amx_bf16():
        return "oneDNN's AMX bf16 convolution sums in an order that depends on the number of patches"
    return None


def install(visual: Any) -> bool:
    """Give the patch embedding of the vision tower ``visual`` :func:`forward`, where it applies and
    matches. Returns whether it was installed."""
    patch_embed = getattr(visual, "patch_embed", None)
    if (reason := applies(patch_embed)) is not None:
        return _not_installed(reason)
    try:
        same = matches(patch_embed)
    except Exception as error:  # a transformers version whose patch embedding this does not know
        return _not_installed(f"the check raised {type(error).__name__}: {error}")
    if not same:
        return _not_installed("its output differs from transformers' on this machine")
    patch_embed.forward = functools.partial(forward, patch_embed)  # type: ignore[union-attr]
    log.info("patch embedding: one convolution over a grid of %d patches a line", WIDTH)
    return True


def matches(patch_embed: Any) -> bool:
    """Whether :func:`forward` equals ``patch_embed``'s own forward bit for bit on random float32 rows
    (what the processor hands over, for any dtype): the largest call (:data:`LINES` full lines),
    then a few full lines and a short one, then fewer rows than a line."""
    generator = torch.Generator().manual_seed(0)
    features = patch_embed.proj.weight[0].numel()
    with torch.inference_mode():
        for rows in (LINES * WIDTH, 3 * WIDTH + 12, 8):
            hidden = torch.randn(rows, features, generator=generator) * 2
            if not torch.equal(type(patch_embed).forward(patch_embed, hidden), forward(patch_embed, hidden)):
                return False
    return True


def _not_installed(reason: str) -> bool:
    log.info("patch embedding: transformers' own (%s)", reason)
    return False
