"""The extraction core: run Qwen2.5-VL on requests and return their outputs as named arrays.

No gRPC here. Requests are prepared (decoded images + prompt -> processor tensors) anywhere, then
run one at a time or as a batch on the thread that owns the device. A batch runs the vision tower
once over the concatenated patches of all its images (variable resolution, no padding) and the
language model once over right-padded sequences, and only for the requests that need it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch.nn import functional

from qwen25vl_embed_server.core.defaults import DEFAULT_PROMPT
from qwen25vl_embed_server.core.errors import DeviceOutOfMemoryError, InvalidInputError
from qwen25vl_embed_server.core.model import outputs as names
from qwen25vl_embed_server.core.model.capture import capturing
from qwen25vl_embed_server.core.model.dtypes import dtype_name
from qwen25vl_embed_server.core.model.finishing import Extraction, Finisher, serving
from qwen25vl_embed_server.core.model.loading import LoadedModel
from qwen25vl_embed_server.core.model.model_info import AdapterInfo, ModelInfo, RecipeInfo
from qwen25vl_embed_server.core.model.output_settings import OutputSettings
from qwen25vl_embed_server.core.model.outputs import (
    DEFAULT_OUTPUTS,
    RETRIEVAL_OUTPUTS,
    OutputPlan,
    available_outputs,
    merge_plans,
    plan_outputs,
)
from qwen25vl_embed_server.core.model.prompt import prepare_inputs, render_text
from qwen25vl_embed_server.core.retrieval.lora import adapter_rows, lora_key, lora_order
from qwen25vl_embed_server.core.retrieval.tasks import check_dimensions, resolve_task
from qwen25vl_embed_server.core.scheduling.pieces import PiecewiseRun, piece_count


@dataclass(frozen=True)
class Prepared:
    """One request, ready for the model: the processor's CPU tensors, what to return and how.

    ``inputs`` holds input_ids / attention_mask / mm_token_type_ids [1, T] and, unless the request
    is text only, pixel_values [Np, C*t*p*p] and image_grid_thw [num_images, 3]. ``plan`` names
    the outputs; ``settings`` says how the finishing shapes them (wire dtype, normalisation,
    retrieval size and encoding); ``adapter``: the retrieval adapter it runs with (None: the base);
    ``task``: the recipe's task ("": a recipe without tasks)."""

    inputs: dict[str, torch.Tensor]
    plan: OutputPlan
    settings: OutputSettings = field(default_factory=OutputSettings)
    adapter: str | None = None
    task: str = ""

    @property
    def lora(self) -> str | None:  # the key of the LoRA its rows compute with (lora_key); None: the base
        return lora_key(self.adapter, self.task)

    @property
    def has_images(self) -> bool:
        return "pixel_values" in self.inputs

    @property
    def sequence_length(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    @property
    def num_patches(self) -> int:
        return int(self.inputs["pixel_values"].shape[0]) if self.has_images else 0

    @property
    def image_grid_thw(self) -> torch.Tensor:
        """[num_images, 3] int64 ([0, 3] for a text request)."""
        return self.inputs["image_grid_thw"] if self.has_images else torch.zeros((0, 3), dtype=torch.int64)

    @property
    def cost(self) -> int:
        """Work in tokens: vision patches, plus the sequence if the language model must run."""
        return self.num_patches + (self.sequence_length if self.plan.needs_lm else 0)


class Extractor:
    """Runs requests on a loaded model. Not thread-safe: give :meth:`run` one owner thread.

    ``adapter_batching``: how requests of different adapters share a forward: "mixed" (one
    forward, each row its adapter's LoRA) or "grouped" (one forward per adapter).
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self._visual = loaded.visual
        self._lm = loaded.language_model
        self._merge_unit = int(self._visual.spatial_merge_size) ** 2
        pad = loaded.processor.tokenizer.pad_token_id
        self._pad_token_id = int(pad if pad is not None else 0)
        self.num_lm_layers = len(self._lm.layers)
        self.num_vision_layers = len(self._visual.blocks)
        self.recipe = loaded.recipe
        self._retrieval = loaded.recipe.outputs if loaded.recipe is not None else None
        self._finisher = Finisher(loaded)
        self.adapter_batching = "mixed"

    @property
    def merge_unit(self) -> int:
        """Vision patches per image token (spatial_merge_size squared)."""
        return self._merge_unit

    def result_bytes(self, prepared: Prepared) -> int:
        """Bytes of ``prepared``'s outputs once run (see :func:`~.cost.result_bytes`)."""
        from qwen25vl_embed_server.core.admission.cost import result_bytes

        config = self.loaded.model.config
        return result_bytes(
            prepared.plan,
            int(prepared.image_grid_thw.shape[0]),
            prepared.num_patches,
            prepared.sequence_length,
            self._merge_unit,
            int(config.vision_config.hidden_size),
            int(config.text_config.hidden_size),
            prepared.settings.dtype,
            self.dimension(prepared.adapter),
        )

    @property
    def outputs(self) -> tuple[str, ...]:
        """Every output name: the base's, and the adapters' retrieval outputs."""
        own = available_outputs(self.num_lm_layers, self.num_vision_layers, self._retrieval)
        extra = dict.fromkeys(n for a in self.loaded.adapters.values() for n in a.recipe.outputs if n not in own)
        cut = len(own) - self.num_lm_layers - self.num_vision_layers
        return (*own[:cut], *extra, *own[cut:])

    @property
    def retrieval_dim(self) -> int:
        """Size of the retrieval vectors (the head's output, else the hidden size); 0 without a recipe."""
        if self.recipe is None:
            return 0
        if self.loaded.head is not None and self.recipe.pooling == "tokens":  # else the head is a second output's
            return int(self.loaded.head.out_features)
        return int(self.loaded.model.config.text_config.hidden_size)

    def dimension(self, adapter: str | None) -> int:
        """:attr:`retrieval_dim` of the model (None or "") or of ``adapter`` (InvalidInputError if unknown)."""
        if not adapter:
            return self.retrieval_dim
        serving(self.loaded, adapter)
        return self.loaded.adapters[adapter].dimension

    def info(self) -> ModelInfo:
        """What callers may know of the model: sizes, resize range, outputs."""
        loaded = self.loaded
        vision = loaded.model.config.vision_config
        size = loaded.processor.image_processor.size
        return ModelInfo(
            model=loaded.name,
            device=str(loaded.device),
            dtype=dtype_name(loaded.dtype),
            vision_hidden_size=int(vision.hidden_size),
            hidden_size=int(loaded.model.config.text_config.hidden_size),
            patch_size=int(vision.patch_size),
            spatial_merge_size=int(vision.spatial_merge_size),
            temporal_patch_size=int(vision.temporal_patch_size),
            min_pixels=int(size["shortest_edge"]),
            max_pixels=int(size["longest_edge"]),
            outputs=self.outputs,
            default_outputs=self._retrieval[:1] if self._retrieval else DEFAULT_OUTPUTS,
            num_lm_layers=self.num_lm_layers,
            num_vision_layers=self.num_vision_layers,
            load_seconds=loaded.load_seconds,
            recipe=RecipeInfo.of(self.recipe, self.retrieval_dim, loaded.head) if self.recipe is not None else None,
            arithmetic=loaded.arithmetic,
            adapters=tuple(map(AdapterInfo.of, loaded.adapters.values())),
        )

    def plan(self, requested: Sequence[str], has_images: bool = True, adapter: str | None = None) -> OutputPlan:
        """Validate output names for this model, or for it with ``adapter`` (raises :class:`InvalidInputError`)."""
        recipe, _ = serving(self.loaded, adapter)
        retrieval = recipe.outputs if recipe is not None else None
        asked = [name for name in requested if name in RETRIEVAL_OUTPUTS]
        if asked and recipe is None and self.loaded.adapters:
            raise InvalidInputError(
                f"output {asked[0]!r} needs an adapter: the base serves raw states; "
                f"name one of this server's adapters: {', '.join(self.loaded.adapters)}"
            )
        return plan_outputs(tuple(requested), self.num_lm_layers, self.num_vision_layers, has_images, retrieval)

    def plan_request(self, request: Any) -> OutputPlan:
        """:meth:`plan` for an :class:`~.request.EncodedRequest` (its outputs and adapter; text-only or not)."""
        return self.plan(request.outputs, has_images=bool(request.images), adapter=request.adapter)

    def prepare(
        self,
        images: Sequence[Image.Image],
        prompt: str = DEFAULT_PROMPT,
        plan: OutputPlan | None = None,
        settings: OutputSettings | None = None,
        *,
        processor: Any = None,
        prompt_format: str = "chat",
        pixels: tuple[int, int] | None = None,
        adapter: str | None = None,
        task: str = "",
    ) -> Prepared:
        """Preprocess one request (CPU only); no images: a text request. Raises :class:`InvalidInputError`.

        ``settings``: how the outputs are finished (None: the defaults), checked against this model
        (:meth:`.OutputSettings.check`). ``processor``: one private to the calling thread (None: the
        model's own, which one thread at a time may use; see
        :func:`~qwen25vl_embed_server.core.admission.request.check_prompt_tokens`). ``prompt_format``:
        see :mod:`~.prompt`. ``pixels``: this request's (min, max) resize range, already checked by
        :func:`~qwen25vl_embed_server.core.admission.request.pixel_range`; None: the processor's.
        ``adapter``: the retrieval adapter to run with (None or "": the model's own recipe, if any);
        ``task``: the recipe's task (""; its default).
        """
        settings = settings if settings is not None else OutputSettings()
        recipe, _ = serving(self.loaded, adapter)
        settings.check(self.dimension(adapter))
        task = resolve_task(recipe, task)
        processor = processor if processor is not None else self.loaded.processor
        text = render_text(processor, len(images), prompt, prompt_format, recipe, task)
        inputs = prepare_inputs(processor, images, text, pixels)
        plan = plan or self.plan((), has_images=bool(images), adapter=adapter)
        check_dimensions(recipe, settings.dimensions, plan.names)
        return Prepared(inputs=dict(inputs), plan=plan, settings=settings, adapter=adapter or None, task=task)

    def extract(
        self,
        images: Sequence[Image.Image],
        prompt: str = DEFAULT_PROMPT,
        plan: OutputPlan | None = None,
        settings: OutputSettings | None = None,
        *,
        prompt_format: str = "chat",
        adapter: str | None = None,
    ) -> Extraction:
        """Run the model on ``images`` (one multi-image prompt; none: a text request) and ``prompt``.

        Only what ``plan`` needs runs: without LM outputs the language model is skipped. Pooled
        vectors are means computed in float32; ``settings.normalize`` L2-normalises them.
        """
        prepared = self.prepare(images, prompt, plan, settings, prompt_format=prompt_format, adapter=adapter)
        return self.run([prepared])[0]

    def run(self, batch: Sequence[Prepared]) -> list[Extraction]:
        """Run prepared requests as one batch; results in the same order.

        Requests without LM outputs share one vision-tower forward; the others share full
        forwards (vision inside), one per group of similar sequence lengths (see
        :func:`similar_lengths`). Each result equals the request run alone, up to floating-point
        reordering in batched kernels.
        """
        results: dict[int, Extraction] = {}
        with torch.inference_mode(), self.translating_memory_errors(batch):
            for needs_lm, adapter in self._groups(batch):
                group = [
                    i for i, item in enumerate(batch) if (item.plan.needs_lm, self._key(item)) == (needs_lm, adapter)
                ]
                # The LM runs right-padded sequences: only similar lengths share a forward.
                parts = similar_lengths(group, [item.sequence_length for item in batch]) if needs_lm else [group]
                for part in parts:  # each LoRA's rows side by side: one slice per LoRA in every layer
                    in_order = [part[i] for i in lora_order([batch[j].lora for j in part])]
                    extractions = self._run_group([batch[i] for i in in_order], needs_lm)
                    results.update(zip(in_order, extractions, strict=True))
        return [results[i] for i in range(len(batch))]

    def _key(self, item: Prepared) -> str | None:
        """What keeps requests apart beside ``needs_lm``: the adapter, when batches are grouped by
        it (the vision tower has no adapter: vision-only requests always share)."""
        return item.lora if self.adapter_batching == "grouped" and item.plan.needs_lm else None

    def _groups(self, batch: Sequence[Prepared]) -> list[tuple[bool, str | None]]:
        keys = {(item.plan.needs_lm, self._key(item)): None for item in batch}
        return sorted(keys, key=lambda key: (key[0], key[1] or ""))

    def pieces(self, item: Prepared, max_piece_tokens: int) -> int:
        """How many pieces :meth:`run_in_pieces` splits ``item`` into (1: it runs whole; 0: never split)."""
        return piece_count(item, max_piece_tokens)

    def run_in_pieces(self, item: Prepared, max_piece_tokens: int) -> PiecewiseRun:
        """``item``'s run as a :class:`~.pieces.PiecewiseRun` (vision a few images at a time, then
        the language model), for :meth:`pieces` > 1; its result equals :meth:`run`'s."""
        return PiecewiseRun(self, item, max_piece_tokens)

    def finish(self, item: Prepared, out: dict[str, torch.Tensor]) -> Extraction:
        """Derived outputs (image rows, pools), then one device -> host copy per tensor
        (:meth:`.finishing.Finisher.finish`)."""
        return self._finisher.finish(item, out)

    @contextmanager
    def translating_memory_errors(self, batch: Sequence[Prepared]) -> Iterator[None]:
        """Turn running out of memory on ``batch`` into :class:`DeviceOutOfMemoryError`, cache released."""
        try:
            yield
        except (torch.OutOfMemoryError, MemoryError) as error:  # the device's memory, or host RAM
            _release_device_memory(self.loaded.device)
            where = "the device" if isinstance(error, torch.OutOfMemoryError) else "the server (host memory)"
            raise DeviceOutOfMemoryError(
                f"{where} ran out of memory on {len(batch)} request(s) "
                f"({sum(item.num_patches for item in batch)} patches); retry with fewer or smaller images"
            ) from error

    def _run_group(self, batch: list[Prepared], needs_lm: bool) -> list[Extraction]:
        device = self.loaded.device
        # Text requests (no images) sit beside image requests: they add no patches.
        with_images = [item for item in batch if item.has_images]
        grid = torch.cat([item.image_grid_thw for item in batch])
        pixel_values = (
            torch.cat([item.inputs["pixel_values"] for item in with_images]).to(device) if with_images else None
        )
        grid_arg = grid.to(device) if with_images else None
        plan = merge_plans([item.plan for item in batch])
        with capturing(self._visual, self._lm, plan) as captured:
            if needs_lm:
                padded = _pad_right([item.inputs for item in batch], self._pad_token_id)
                with adapter_rows([item.lora for item in batch]):
                    last_hidden = self.loaded.model.model(
                        **{key: value.to(device) for key, value in padded.items()},
                        pixel_values=pixel_values,
                        image_grid_thw=grid_arg,
                        use_cache=False,
                    ).last_hidden_state
            else:
                self.loaded.model.model.get_image_features(pixel_values, grid_arg)
        assert captured.projected is not None or not with_images, "the vision tower's output hook did not fire"

        # Vision tensors cover all images of the group, in image order: split them per request.
        patches = [item.num_patches for item in batch]
        projected: Sequence[torch.Tensor] = (
            captured.projected.split([n // self._merge_unit for n in patches]) if captured.projected is not None else ()
        )
        tokens, in_order = captured.vision_in_image_order(self._visual, grid, self._merge_unit)
        vision_tokens: Sequence[torch.Tensor] = () if tokens is None else tokens.split(patches)
        blocks = {k: block.split(patches) for k, block in in_order.items()}

        results = []
        for row, item in enumerate(batch):
            out = {names.PROJECTED_TOKENS: projected[row]} if item.has_images else {}
            if vision_tokens:
                out[names.VISION_TOKENS] = vision_tokens[row]
            for k, aliases in item.plan.vision_layers.items():
                out.update(dict.fromkeys(aliases, blocks[k][row]))
            if needs_lm:
                length = item.sequence_length
                out[names.LM_LAST_HIDDEN] = last_hidden[row : row + 1, :length]
                for k, aliases in item.plan.lm_layers.items():
                    out.update(dict.fromkeys(aliases, captured.lm_layers[k][row : row + 1, :length]))
            results.append(self.finish(item, out))
        return results


MAX_PADDING = 0.125
"""Largest share of padding in one LM forward: beyond it the padded tokens cost more than the batch saves."""


def similar_lengths(
    indices: Sequence[int], lengths: Sequence[int], max_padding: float = MAX_PADDING
) -> list[list[int]]:
    """``indices`` grouped for right-padded LM forwards: each group's padding at most ``max_padding``.

    A batch pads every sequence to its longest, so a 300-token request beside a 3000-token one
    costs the LM 3000 tokens. Sorted by length, each group grows while ``longest x count`` stays
    within ``(1 + max_padding) x`` its real tokens. Groups keep the caller's order inside.
    """
    ordered = sorted(indices, key=lambda i: lengths[i])
    groups: list[list[int]] = []
    real = 0
    for i in ordered:
        if groups and lengths[i] * (len(groups[-1]) + 1) <= (1 + max_padding) * (real + lengths[i]):
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return [sorted(group) for group in groups]


def _pad_right(inputs: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / mm_token_type_ids of several requests, right-padded to [B, Tmax].

    Right padding keeps every real token at its unbatched position; the attention mask hides the
    padding and the M-RoPE positions are computed from the unpadded tokens.
    """
    longest = max(int(item["input_ids"].shape[1]) for item in inputs)
    fills = {"input_ids": pad_token_id, "attention_mask": 0, "mm_token_type_ids": 0}
    return {
        key: torch.cat([functional.pad(item[key], (0, longest - item[key].shape[1]), value=fill) for item in inputs])
        for key, fill in fills.items()
    }


def _release_device_memory(device: torch.device) -> None:
    """Give cached blocks back after an out-of-memory error, so the next request can run."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
