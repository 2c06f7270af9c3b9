"""Pooling methods, selected by name: token rows ``[T, C]`` -> one vector ``[1, C]`` in float32,
and which tokens and method make each pooled output."""

from __future__ import annotations

from collections.abc import Callable

import torch

from qwen25vl_embed_server.core.model import outputs as names


def mean(tokens: torch.Tensor) -> torch.Tensor:
    """The mean over the rows of ``tokens`` [T, C], in float32: [1, C]."""
    return tokens.float().mean(0, keepdim=True)


def last(tokens: torch.Tensor) -> torch.Tensor:
    """The final row of ``tokens`` [T, C], in float32: [1, C]."""
    return tokens[-1:].float()


METHODS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"mean": mean, "last": last}
"""Pooling methods by name."""

POOLINGS: dict[str, tuple[str, str]] = {
    names.VISION_POOLED_MEAN: (names.VISION_TOKENS, "mean"),
    names.PROJECTED_POOLED_MEAN: (names.PROJECTED_TOKENS, "mean"),
    names.LM_POOLED_MEAN: (names.LM_LAST_HIDDEN, "mean"),
    names.LM_IMAGE_POOLED_MEAN: (names.LM_IMAGE_TOKENS, "mean"),
    names.LM_LAST_TOKEN: (names.LM_LAST_HIDDEN, "last"),
}
"""Each pooled output -> (the token output it pools, the method)."""


def pool(name: str, out: dict[str, torch.Tensor]) -> torch.Tensor:
    """Pooled output ``name`` [1, C] in float32, from the token tensors in ``out``."""
    source, method = POOLINGS[name]
    tokens = out[source]
    if source == names.LM_LAST_HIDDEN:  # [1, T, C]: one request's sequence
        tokens = tokens[0]
    return METHODS[method](tokens)
