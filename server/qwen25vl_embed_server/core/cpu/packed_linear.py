"""Linear layers whose weights are prepacked for oneDNN, the CPU's fastest matmul path here.

On the CPU torch runs an ``nn.Linear`` through MKL (float32) or oneDNN (bfloat16), re-laying out
the weight for the kernel on every call. Packing each weight once at load, in oneDNN's blocked
layout, and calling oneDNN's linear directly is what inductor's freezing pass and vLLM's CPU
backend do. What it costs in exactness depends on the dtype:

- **bfloat16**: torch's own bf16 matmul is oneDNN's, so the packed layer computes the same sums in
  the same order: the result is bit-identical (checked in ``tests/core/test_packed_linear.py``).
  Packing is on by default wherever oneDNN's bf16 kernels run (CPUs with AVX-512).
- **float32**: torch's fp32 matmul is MKL's; oneDNN sums in another order, so results differ by
  float rounding (about 1e-6 relative on the models tested) and are no longer bit-exact against
  transformers. It is opt-in (``fp32_matmul="onednn"``): with MKL choosing its kernels by CPU
  features (:mod:`~.mkl_dispatch`) the gain is about 1.1x in the model on an AMD CPU with
  AVX-512; under MKL's own choice (its slower kernels on AMD CPUs) it was about 1.6x.

Nothing here runs on cuda or mps: packing applies to CPU models only.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qwen25vl_embed_server.core.cpu.patch_embedding import as_linear

log = logging.getLogger(__name__)

# Never called by the extractor (it reads hidden states, not logits): packing it would only cost memory.
_SKIPPED = ("lm_head",)


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight in oneDNN's packed layout (inference only).

    The packed weight is an opaque oneDNN tensor, not a parameter: pack after the model has its
    final device and dtype, and do not move the module afterwards.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(inputs, self.packed_weight, self.bias, "none", [], "")
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedPatchEmbed(nn.Module):
    """The vision tower's patch embedding as one packed matmul.

    transformers runs it as a Conv3d whose kernel equals its stride and covers a whole patch (channels
    x temporal x height x width): per patch that is a dot product with the flattened kernel, i.e. a
    linear layer on the processor's rows. oneDNN sums it in another order than its convolution, so
    it is used with ``fp32_matmul="onednn"`` only.
    """

    def __init__(self, patch_embed: nn.Module) -> None:
        super().__init__()
        linear = as_linear(patch_embed)
        self.embed_dim, self.in_features, self.dtype = linear.out_features, linear.in_features, linear.weight.dtype
        self.projection = PackedLinear(linear)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, self.in_features).to(self.dtype)
        out: torch.Tensor = self.projection(flat)
        return out


def packing_applies(device: torch.device, dtype: torch.dtype, fp32_matmul: str = "exact") -> bool:
    """Whether :func:`pack_linears` should run for a model on ``device`` in ``dtype``."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        # Where oneDNN's bf16 kernels are not used by torch itself, packing would change the result.
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32 and fp32_matmul == "onednn"


def pack_linears(model: nn.Module, patch_embed: bool = False) -> int:
    """Replace every ``nn.Linear`` of ``model`` (but the unused ``lm_head``) by a :class:`PackedLinear`,
    and with ``patch_embed`` the vision tower's patch embedding by a :class:`PackedPatchEmbed`.

    Returns how many were packed. The original weights are dropped with the modules they belonged to.
    """
    packed = 0
    with torch.no_grad():  # not inference_mode: the packed weights must be usable outside it
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and name not in _SKIPPED:
                    setattr(parent, name, PackedLinear(child))
                    packed += 1
        visual = getattr(getattr(model, "model", None), "visual", None)
        if patch_embed and visual is not None:
            visual.patch_embed = PackedPatchEmbed(visual.patch_embed)
            packed += 1
    log.info("packed %d linear layers for oneDNN", packed)
    return packed
