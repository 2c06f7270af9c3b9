"""The vision tower's attention with fewer passes and one call per run of equal windows, bit-identical.

transformers' SDPA path for Qwen2.5-VL's vision tower does, in every block:

- the rotary embedding in about six element-wise passes per tensor, queries and keys apart:
  ``x.float()``, ``x * cos``, ``-x2``, ``cat``, ``* sin``, ``+``, ``.to(dtype)``;
- one attention call per attention window in a Python loop (16 per 448x448 image in each windowed
  block), then a copy of each window's output and a ``cat``.

:func:`forward` computes the same thing with less work, and the same bits:

- :func:`rotary` rotates queries and keys in one tensor: ``x * cos``, then each half's rotated term
  subtracted or added in place. ``rotate_half(x) * sin`` is ``(-x2 * s1, x1 * s2)``, and IEEE
  arithmetic gives ``(-a) * b == -(a * b)`` and ``c + (-d) == c - d`` exactly, so every element goes
  through the same rounded operations as in transformers. No fused multiply-add: ``addcmul`` rounds
  once and would differ.
- windows of equal length (all but the edge windows of an image, all images of a size in the
  full-attention blocks) run as one batched SDPA call. The CPU kernel computes each (window, head)
  on its own with block sizes that depend only on the window's length, so a window's output is the
  same as when it runs alone.

:func:`install` puts :func:`forward` on CPU models that use SDPA, once a check on this machine found
its output equal, bit for bit, to transformers' on a block of the model itself (the rounding of
element-wise ops is fixed by IEEE, but kernel choices are the libraries'). Elsewhere, or if the
check fails, transformers' forward stays, and the log says why.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn import functional

log = logging.getLogger(__name__)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` computed in float32, returned in ``x``'s dtype.

    ``cos`` and ``sin`` are float32 and broadcast against ``x`` ([..., head_dim]). Bit-identical to
    transformers' ``apply_rotary_pos_emb_vision`` for one tensor (see the module docstring).
    """
    half = x.shape[-1] // 2
    wide = x.to(torch.float32)  # one vectorised copy; mixed-dtype element-wise ops are slow on the CPU
    out = wide * cos
    term = wide[..., half:] * sin[..., :half]
    out[..., :half].sub_(term)
    torch.mul(wide[..., :half], sin[..., half:], out=term)
    out[..., half:].add_(term)
    return out.to(x.dtype)


def equal_runs(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """``lengths`` as consecutive runs of equal values: [(count, length), ...] in order."""
    runs: list[tuple[int, int]] = []
    for length in lengths:
        if runs and runs[-1][1] == length:
            runs[-1] = (runs[-1][0] + 1, length)
        else:
            runs.append((1, length))
    return runs


def forward(
    attention: Any,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    attend: Callable[..., torch.Tensor] | None = None,
    **_: Any,
) -> torch.Tensor:
    """``Qwen2_5_VLVisionAttention.forward`` of ``attention`` (SDPA), with fewer passes.

    ``hidden_states`` [S, C] holds the windows (or images) one after the other, ``cu_seqlens``
    their boundaries, ``position_embeddings`` the (cos, sin) [S, head_dim] of every row. ``attend``
    computes the attention of a run of windows with SDPA's signature (SDPA itself when None;
    another arithmetic: :func:`~.bf16_arithmetic.attend`).
    """
    assert position_embeddings is not None, "Qwen2.5-VL's vision blocks get their rotary embedding"
    rows = hidden_states.shape[0]
    heads = int(attention.num_heads)
    qkv = attention.qkv(hidden_states).reshape(rows, 3, heads, -1)
    cos, sin = (t.to(torch.float32)[:, None, None, :] for t in position_embeddings)
    rotated = rotary(qkv[:, :2], cos, sin)  # queries and keys together: [S, 2, heads, head_dim]
    query, key, value = rotated[:, 0], rotated[:, 1], qkv[:, 2]
    outputs = []
    start = 0
    attend = attend or functional.scaled_dot_product_attention
    for count, length in equal_runs((cu_seqlens[1:] - cu_seqlens[:-1]).tolist()):
        q, k, v = (_windows(states, start, count, length) for states in (query, key, value))
        out = attend(q, k, v, dropout_p=0.0, scale=attention.scaling)
        outputs.append(out.transpose(1, 2).reshape(count * length, -1))
        start += count * length
    result: torch.Tensor = attention.proj(outputs[0] if len(outputs) == 1 else torch.cat(outputs))
    return result


def _windows(states: torch.Tensor, start: int, count: int, length: int) -> torch.Tensor:
    """``count`` windows of ``length`` rows of ``states`` [S, heads, head_dim] from row ``start``,
    as SDPA takes them: [count, heads, length, head_dim]."""
    windows: torch.Tensor = states[start : start + count * length].unflatten(0, (count, length))
    return windows.transpose(1, 2)


def install(visual: Any, attend: Callable[..., torch.Tensor] | None = None) -> bool:
    """Give every block of the vision tower ``visual`` :func:`forward`, where it applies and matches.

    Returns whether it was installed. Applies to CPU towers whose attention is SDPA; matching means
    the check of :func:`matches` on the first block passed. The blocks compute their attention with
    ``attend`` (:func:`forward`'s); the check runs SDPA itself, as transformers does.
    """
    blocks = list(getattr(visual, "blocks", ()))
    if not blocks:
        return _not_installed("the vision tower has no blocks")
    norm = blocks[0].norm1.weight  # a parameter still where the linear layers are packed
    device, dtype = norm.device, norm.dtype
    implementation = getattr(blocks[0].attn.config, "_attn_implementation", None)
    if device.type != "cpu":
        return _not_installed(f"the model is on {device.type}, not the CPU")
    if implementation != "sdpa":
        return _not_installed(f"attention is {implementation!r}, not 'sdpa'")
    try:
        same = matches(blocks[0].attn, dtype)
    except Exception as error:  # a transformers version whose attention this forward does not know
        return _not_installed(f"the check raised {type(error).__name__}: {error}")
    if not same:
        return _not_installed("its output differs from transformers' on this machine")
    for block in blocks:
        block.attn.forward = functools.partial(forward, block.attn, attend=attend)
    log.info("vision attention: one call per run of equal windows, rotary in fewer passes")
    return True


def matches(attention: Any, dtype: torch.dtype) -> bool:
    """Whether :func:`forward` equals ``attention``'s own forward bit for bit, on random ``dtype``
    rows in windows of 64, 64, 48 and 64 tokens (two that share a call, then two alone) and random
    rotary angles."""
    generator = torch.Generator().manual_seed(0)
    lengths = [64, 64, 48, 64]
    rows = sum(lengths)
    hidden = torch.randn(rows, attention.proj.out_features, generator=generator).to(dtype)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    head_dim = attention.qkv.out_features // 3 // attention.num_heads
    angles = torch.rand(rows, head_dim // 2, generator=generator) * 100
    embedding = torch.cat([angles, angles], dim=-1)
    arguments: dict[str, Any] = {"cu_seqlens": cu_seqlens, "position_embeddings": (embedding.cos(), embedding.sin())}
    with torch.inference_mode():
        theirs = type(attention).forward(attention, hidden, **arguments)
        ours = forward(attention, hidden, **arguments)
    return bool(torch.equal(theirs, ours))


def _not_installed(reason: str) -> bool:
    log.info("vision attention: transformers' own (%s)", reason)
    return False
