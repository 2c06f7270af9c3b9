"""The CPU levers applied to a loaded model, in the one order that keeps each of them right.

:func:`apply` is the only place that installs them; the loader calls it once the model and any
retrieval head have their final device and dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from qwen25vl_embed_server.core.cpu import bf16_arithmetic, mkl_dispatch, patch_embedding, vision_attention
from qwen25vl_embed_server.core.cpu.packed_linear import PackedLinear, pack_linears, packing_applies

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Applied:
    """What :func:`apply` did. ``head``: the retrieval head as it now runs (wrapped like the
    model's own linear layers; None when there is none). ``arithmetic``: how the dot products run
    (:data:`~qwen25vl_embed_server.core.defaults.ARITHMETICS`: "exact", "fp32-onednn" or
    "bf16-float32"). ``summary``: a few words for the load's log line ("" when nothing changed the
    arithmetic)."""

    head: Any
    arithmetic: str
    summary: str


def apply(
    model: Any, head: Any, device: torch.device, dtype: torch.dtype, fp32_matmul: str, bf16_arithmetic_choice: str
) -> Applied:
    """Install the levers that apply to ``model`` (and ``head``) on ``device`` in ``dtype``.

    ``fp32_matmul`` and ``bf16_arithmetic_choice`` are :class:`~qwen25vl_embed_server.core.model.loading.LoadOptions`'
    choices. The order: the linear layers are packed (or widened to float32 arithmetic; never both)
    first, since both read the final weights; then the vision tower's attention and patch
    embedding, whose install-time checks run the layers as they will run.
    """
    widen = bf16_arithmetic.applies(bf16_arithmetic_choice, device, dtype)
    pack = not widen and packing_applies(device, dtype, fp32_matmul)
    packed_patch_embed = pack and dtype == torch.float32  # fp32 "onednn": the patch embedding as one matmul
    if pack:
        pack_linears(model, patch_embed=packed_patch_embed)
        head = PackedLinear(head) if isinstance(head, torch.nn.Linear) else head
    if widen:  # bf16 weights read per call in float32
        bf16_arithmetic.install(model)
        head = bf16_arithmetic.Float32Linear(head) if isinstance(head, torch.nn.Linear) else head
    if device.type == "cpu":
        vision_attention.install(model.model.visual, attend=bf16_arithmetic.attend if widen else None)
        if not packed_patch_embed and not widen:
            patch_embedding.install(model.model.visual)
        log.info("MKL dispatch: %s", mkl_dispatch.state().reason)
    return Applied(
        head=head,
        arithmetic="bf16-float32" if widen else "fp32-onednn" if packed_patch_embed else "exact",
        summary="oneDNN-packed linears" if pack else "float32 arithmetic" if widen else "",
    )
