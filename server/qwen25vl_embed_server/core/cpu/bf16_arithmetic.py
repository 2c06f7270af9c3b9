"""bfloat16 models computed with float32 arithmetic, on CPUs without bf16 dot products.

A bf16 matmul multiplies bf16 values and sums the products in float32, then rounds the sum to
bf16. CPUs with AVX512-BF16 or AMX do that in hardware. On the others (AVX-512 CPUs before Cooper
Lake / Sapphire Rapids, every AVX2 CPU) oneDNN emulates it, and it runs at a third of the fp32
rate: on an Ice Lake core, a 1336x512 by 512x1536 linear takes 66 ms in bf16 and 22 ms as
``F.linear(x.float(), w.float()).bfloat16()``.

That upcast is the same computation: bf16 values widen to float32 exactly, their products are
exact in float32 (8-bit mantissas), and the sum is rounded to bf16 at the end, as in a native
bf16 matmul. Only the order of summation differs (MKL's, not oneDNN's), so a result differs from
torch's own bf16 by at most one bf16 rounding step where a float32 sum falls near a rounding
boundary (a few elements in 10,000), and is as close to the float32 result as native bf16 is.

:func:`install` gives a bf16 CPU model this arithmetic where the three kinds of dot product run:

- every linear layer (:class:`Float32Linear`): the bf16 weight stays the parameter (the model's
  memory is unchanged) and is widened per call: at the 7B's MLP shape the matmul takes 1867 ms
  against 1596 with a kept float32 copy (one thread), nothing measurable at the bench checkpoint's;
- the vision tower's patch embedding (:class:`Float32PatchEmbed`), as the matmul it is;
- attention, in the language model (an attention function registered with transformers,
  :data:`ATTENTION`) and in the vision tower (:func:`attend`, through
  :func:`~.vision_attention.install`): queries, keys and values widened, the output rounded.

Element-wise work (norms, activations, rotary embeddings) stays as transformers computes it.
:func:`applies` says where this is chosen: ``"auto"`` picks it for bf16 CPU models on CPUs without
bf16 dot products, ``"native"`` never, ``"float32"`` always.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.nn import functional
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from qwen25vl_embed_server.core.cpu.patch_embedding import as_linear, is_patchwise
from qwen25vl_embed_server.core.defaults import BF16_ARITHMETICS

log = logging.getLogger(__name__)

ATTENTION = "sdpa_float32"
"""The name under which the language model's attention is registered with transformers."""

# Never called by the extractor (it reads hidden states, not logits).
_SKIPPED = ("lm_head",)


def cpu_has_bf16_dot_products() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16) and oneDNN, which runs
    torch's bf16 matmuls, may use it: ``ONEDNN_MAX_CPU_ISA`` (AVX2, say) caps oneDNN below the CPU,
    and then torch's bf16 kernels run without those instructions, as on a CPU that lacks them."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    in_hardware = bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    return in_hardware and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def applies(choice: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`install` should run for a model on ``device`` in ``dtype``, for ``choice``."""
    if choice not in BF16_ARITHMETICS:
        raise ValueError(f"unknown bf16 arithmetic {choice!r}; expected one of {', '.join(BF16_ARITHMETICS)}")
    if device.type != "cpu" or dtype != torch.bfloat16 or choice == "native":
        return False
    return choice == "float32" or not cpu_has_bf16_dot_products()


class Float32Linear(nn.Module):
    """``nn.Linear`` in bf16 computed in float32: ``linear(x.float(), w.float(), b.float()).bfloat16()``.

    Holds the original bf16 ``weight`` and ``bias`` (inference only).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return functional.linear(inputs.float(), self.weight.float(), bias).to(inputs.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Float32PatchEmbed(nn.Module):
    """The vision tower's patch embedding (a Conv3d whose kernel covers one patch) as a float32 matmul.

    The processor's float32 rows are rounded to the weights' dtype first, as transformers does; each
    output is then the patch's dot product with the flattened kernel (:func:`~.patch_embedding.as_linear`),
    rounded once.
    """

    def __init__(self, patch_embed: nn.Module) -> None:
        super().__init__()
        linear = as_linear(patch_embed)
        self.in_features, self.dtype = linear.in_features, linear.weight.dtype
        self.projection = Float32Linear(linear)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.projection(hidden_states.reshape(-1, self.in_features).to(self.dtype))
        return out


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``scaled_dot_product_attention`` on widened queries, keys and values, rounded back."""
    out = functional.scaled_dot_product_attention(query.float(), key.float(), value.float(), **kwargs)
    return out.to(query.dtype)


def language_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention function, on widened queries, keys and values, rounded back.
    ``attention_mask`` is :func:`~transformers.masking_utils.sdpa_mask`'s (registered with it): boolean."""
    out, _ = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), None


AttentionInterface.register(ATTENTION, language_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the masks SDPA takes


def install(model: nn.Module) -> int:
    """Give the bf16 CPU model ``model`` float32 arithmetic (see the module docstring).

    Every ``nn.Linear`` (but the unused ``lm_head``) becomes a :class:`Float32Linear`, the patch
    embedding a :class:`Float32PatchEmbed` and the language model's attention :data:`ATTENTION`.
    The vision tower's attention is :func:`~.vision_attention.install`'s to set, with :func:`attend`.
    Returns how many modules were replaced.
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name not in _SKIPPED:
                setattr(parent, name, Float32Linear(child))
                replaced += 1
    body = getattr(model, "model", None)
    visual = getattr(body, "visual", None)
    if visual is not None and is_patchwise(getattr(visual.patch_embed, "proj", None)):
        visual.patch_embed = Float32PatchEmbed(visual.patch_embed)
        replaced += 1
    language_model = getattr(body, "language_model", None)
    if language_model is not None:
        language_model.config._attn_implementation = ATTENTION
    log.info("bf16 in float32 arithmetic: %d layers widened per call, attention widened", replaced)
    return replaced
