"""Run one large request in bounded pieces, so the batcher can let other batches run between them.

A request's model run becomes: the vision tower over a few consecutive images at a time (each
piece at most ``max_piece_tokens`` patches; an image larger than that is a piece of its own, as the
tower attends across a whole image), then, if the request needs it, the language model over the
full sequence with the image features the vision pieces collected. Each piece is one short call on
a model lane; the batcher decides what runs between two pieces (see :mod:`~.batcher`).

The result equals the request run whole: the vision tower attends within each image only (its
window permutation is computed per piece, for that piece's images), the language model gets the
same embeddings, scattered into the image-token positions exactly as transformers does, and the
same M-RoPE positions (computed from the input ids and the full ``image_grid_thw``). Only the
vision tower's batched kernels see fewer rows per call, which may reorder float sums.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from qwen25vl_embed_server.core.model import outputs as names
from qwen25vl_embed_server.core.model.capture import capturing
from qwen25vl_embed_server.core.retrieval.lora import adapter_rows

if TYPE_CHECKING:
    from qwen25vl_embed_server.core.model.extractor import Extractor, Prepared
    from qwen25vl_embed_server.core.model.finishing import Extraction


def image_groups(patches: list[int], max_piece_tokens: int) -> list[tuple[int, int]]:
    """Consecutive image ranges ``[start, stop)`` of at most ``max_piece_tokens`` patches each
    (at least one image each), for images of ``patches`` patches."""
    groups: list[tuple[int, int]] = []
    start = total = 0
    for index, count in enumerate(patches):
        if index > start and total + count > max_piece_tokens:
            groups.append((start, index))
            start, total = index, 0
        total += count
    if patches:
        groups.append((start, len(patches)))
    return groups


def piece_count(item: Prepared, max_piece_tokens: int) -> int:
    """How many pieces :class:`PiecewiseRun` splits ``item`` into (1: it runs whole)."""
    if not item.has_images or max_piece_tokens <= 0 or item.cost <= max_piece_tokens:
        return 1
    patches = item.image_grid_thw.prod(-1).tolist()
    return len(image_groups(patches, max_piece_tokens)) + (1 if item.plan.needs_lm else 0)


@dataclass
class _VisionParts:
    """What the vision pieces computed so far, each piece's tensors in image order."""

    projected: list[torch.Tensor] = field(default_factory=list)
    vision_tokens: list[torch.Tensor] = field(default_factory=list)
    blocks: dict[int, list[torch.Tensor]] = field(default_factory=dict)


class PiecewiseRun:
    """One request's model run in :attr:`pieces` steps; call :meth:`step` that many times on the
    model thread (inside no other run). The last step returns the :class:`Extraction`."""

    def __init__(self, extractor: Extractor, item: Prepared, max_piece_tokens: int) -> None:
        assert item.has_images, "a text request has no vision pieces"
        self._extractor = extractor
        self._item = item
        grid = item.image_grid_thw
        patches = grid.prod(-1).tolist()
        self._groups = image_groups(patches, max_piece_tokens)
        offsets = [0]
        for count in patches:
            offsets.append(offsets[-1] + count)
        self._offsets = offsets
        self._parts = _VisionParts()
        self.pieces = len(self._groups) + (1 if item.plan.needs_lm else 0)
        self.done = 0

    def step(self) -> Extraction | None:
        """Run the next piece; the result after the last one, else None."""
        assert self.done < self.pieces, "every piece already ran"
        with torch.inference_mode(), self._extractor.translating_memory_errors([self._item]):
            if self.done < len(self._groups):
                self._vision_piece(*self._groups[self.done])
                result = None if self.done + 1 < self.pieces else self._finish(None, {})
            else:
                result = self._language_piece()
        self.done += 1
        return result

    def _vision_piece(self, start: int, stop: int) -> None:
        """The vision tower over images ``[start, stop)``; its captures kept in image order."""
        extractor, item = self._extractor, self._item
        loaded, device = extractor.loaded, extractor.loaded.device
        grid = item.image_grid_thw[start:stop]
        pixels = item.inputs["pixel_values"][self._offsets[start] : self._offsets[stop]].to(device)
        with capturing(loaded.visual, loaded.language_model, item.plan) as captured:
            loaded.model.model.get_image_features(pixels, grid.to(device))
        assert captured.projected is not None, "the vision tower's output hook did not fire"
        self._parts.projected.append(captured.projected)
        tokens, blocks = captured.vision_in_image_order(loaded.visual, grid, extractor.merge_unit)
        if tokens is not None:
            self._parts.vision_tokens.append(tokens)
        for k, block in blocks.items():
            self._parts.blocks.setdefault(k, []).append(block)

    def _language_piece(self) -> Extraction:
        """The language model over the whole sequence, the collected features in the image tokens."""
        extractor, item = self._extractor, self._item
        loaded, device = extractor.loaded, extractor.loaded.device
        inner = loaded.model.model
        inputs = {key: item.inputs[key].to(device) for key in ("input_ids", "attention_mask", "mm_token_type_ids")}
        input_ids = inputs["input_ids"]
        embeds = inner.get_input_embeddings()(input_ids)
        features = torch.cat(self._parts.projected).to(embeds.device, embeds.dtype)
        image_rows = (input_ids == int(loaded.model.config.image_token_id)).unsqueeze(-1)
        # What transformers' forward does with pixel_values, given the features it would compute.
        embeds = embeds.masked_scatter(image_rows.expand_as(embeds), features)
        with capturing(loaded.visual, loaded.language_model, item.plan) as captured, adapter_rows([item.lora]):
            last_hidden = inner(
                **inputs, inputs_embeds=embeds, image_grid_thw=item.image_grid_thw.to(device), use_cache=False
            ).last_hidden_state
        return self._finish(last_hidden, captured.lm_layers)

    def _finish(self, last_hidden: torch.Tensor | None, lm_layers: dict[int, torch.Tensor]) -> Extraction:
        """The request's outputs as :meth:`Extractor._run_group` names them, then derived ones."""
        item, parts = self._item, self._parts
        out = {names.PROJECTED_TOKENS: torch.cat(parts.projected)}
        if parts.vision_tokens:
            out[names.VISION_TOKENS] = torch.cat(parts.vision_tokens)
        for k, aliases in item.plan.vision_layers.items():
            out.update(dict.fromkeys(aliases, torch.cat(parts.blocks[k])))
        if last_hidden is not None:
            out[names.LM_LAST_HIDDEN] = last_hidden
            for k, aliases in item.plan.lm_layers.items():
                out.update(dict.fromkeys(aliases, lm_layers[k]))
        return self._extractor.finish(item, out)
