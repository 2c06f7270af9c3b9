"""The extraction core: run Qwen2.5-VL on requests and return their outputs as named arrays.

No gRPC here. Requests are prepared (decoded images + prompt -> processor tensors) anywhere, then
run one at a time or as a batch on the thread that owns the device. A batch runs the vision tower
once over the concatenated patches of all its images (variable resolution, no padding) and the
language model once over right-padded sequences, and only for the requests that need it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import torch
from PIL import Image
from torch.nn import functional

from qwen25vl_embed_server.core import outputs as names
from qwen25vl_embed_server.core.capture import capturing
from qwen25vl_embed_server.core.defaults import DEFAULT_PROMPT, DEFAULT_WIRE_DTYPE
from qwen25vl_embed_server.core.dtypes import TORCH_DTYPES, dtype_name
from qwen25vl_embed_server.core.errors import DeviceOutOfMemoryError, InvalidInputError
from qwen25vl_embed_server.core.loading import LoadedModel
from qwen25vl_embed_server.core.model_info import ModelInfo
from qwen25vl_embed_server.core.outputs import DEFAULT_OUTPUTS, OutputPlan, available_outputs, merge_plans, plan_outputs
from qwen25vl_embed_server.core.prompt import prepare_inputs
from qwen25vl_embed_server.core.window_order import to_image_order, window_index


@dataclass(frozen=True)
class Prepared:
    """One request, ready for the model: the processor's CPU tensors and what to return.

    ``inputs`` holds input_ids / attention_mask / mm_token_type_ids [1, T], pixel_values
    [Np, C*t*p*p] and image_grid_thw [num_images, 3].
    """

    inputs: dict[str, torch.Tensor]
    plan: OutputPlan
    dtype: str = DEFAULT_WIRE_DTYPE
    normalize: bool = False

    @property
    def sequence_length(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    @property
    def num_patches(self) -> int:
        return int(self.inputs["pixel_values"].shape[0])

    @property
    def cost(self) -> int:
        """Work in tokens: vision patches, plus the sequence if the language model must run."""
        return self.num_patches + (self.sequence_length if self.plan.needs_lm else 0)


@dataclass(frozen=True)
class Extraction:
    """The outputs of one request.

    ``tensors`` maps each requested output name to its array (see the proto for shapes), floating
    outputs in the requested wire dtype, integer ones int64. ``image_token_positions`` are the
    0-based positions of the Nv image tokens in the LM sequence of length ``sequence_length``.
    """

    tensors: dict[str, np.ndarray]
    visual_token_lens: np.ndarray
    image_grid_thw: np.ndarray
    image_token_positions: np.ndarray
    sequence_length: int


class Extractor:
    """Runs requests on a loaded model. Not thread-safe: give :meth:`run` one owner thread."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self._visual = loaded.visual
        self._lm = loaded.language_model
        self._merge_unit = int(self._visual.spatial_merge_size) ** 2
        self._image_token_id = int(loaded.model.config.image_token_id)
        pad = loaded.processor.tokenizer.pad_token_id
        self._pad_token_id = int(pad if pad is not None else 0)
        self.num_lm_layers = len(self._lm.layers)
        self.num_vision_layers = len(self._visual.blocks)

    @property
    def outputs(self) -> tuple[str, ...]:
        return available_outputs(self.num_lm_layers, self.num_vision_layers)

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
            default_outputs=DEFAULT_OUTPUTS,
            num_lm_layers=self.num_lm_layers,
            num_vision_layers=self.num_vision_layers,
            load_seconds=loaded.load_seconds,
        )

    def plan(self, requested: Sequence[str]) -> OutputPlan:
        """Validate output names for this model (raises :class:`InvalidInputError`)."""
        return plan_outputs(tuple(requested), self.num_lm_layers, self.num_vision_layers)

    def prepare(
        self,
        images: Sequence[Image.Image],
        prompt: str = DEFAULT_PROMPT,
        plan: OutputPlan | None = None,
        dtype: str = DEFAULT_WIRE_DTYPE,
        normalize: bool = False,
        processor: Any = None,
        pixels: tuple[int, int] | None = None,
    ) -> Prepared:
        """Preprocess one request (CPU only). Raises :class:`InvalidInputError`.

        ``processor``: one private to the calling thread (None: the model's own, which one thread
        at a time may use; see :func:`~qwen25vl_embed_server.core.request.check_prompt_tokens`).
        ``pixels``: this request's (min, max) resize range, already checked against
        :meth:`pixel_range`; None: the processor's.
        """
        if dtype not in TORCH_DTYPES:
            raise InvalidInputError(f"unknown dtype {dtype!r}; expected one of {', '.join(TORCH_DTYPES)}")
        inputs = prepare_inputs(processor if processor is not None else self.loaded.processor, images, prompt, pixels)
        return Prepared(inputs=dict(inputs), plan=plan or self.plan(()), dtype=dtype, normalize=normalize)

    def extract(
        self,
        images: Sequence[Image.Image],
        prompt: str = DEFAULT_PROMPT,
        plan: OutputPlan | None = None,
        dtype: str = DEFAULT_WIRE_DTYPE,
        normalize: bool = False,
    ) -> Extraction:
        """Run the model on ``images`` (one multi-image prompt) and ``prompt``.

        Only what ``plan`` needs runs: without LM outputs the language model is skipped. Pooled
        vectors are means computed in float32; ``normalize`` L2-normalises them.
        """
        return self.run([self.prepare(images, prompt, plan, dtype, normalize)])[0]

    def run(self, batch: Sequence[Prepared]) -> list[Extraction]:
        """Run prepared requests as one batch; results in the same order.

        Requests without LM outputs share one vision-tower forward; the others share one full
        forward (vision tower inside). Each result equals the request run alone, up to
        floating-point reordering in batched kernels.
        """
        results: dict[int, Extraction] = {}
        try:
            with torch.inference_mode():
                for needs_lm in (False, True):
                    group = [i for i, item in enumerate(batch) if item.plan.needs_lm == needs_lm]
                    if group:
                        extractions = self._run_group([batch[i] for i in group], needs_lm)
                        results.update(zip(group, extractions, strict=True))
        except torch.OutOfMemoryError as error:
            results.clear()
            _release_device_memory(self.loaded.device)
            raise DeviceOutOfMemoryError(
                f"the device ran out of memory on {len(batch)} request(s) "
                f"({sum(item.num_patches for item in batch)} patches); retry with fewer or smaller images"
            ) from error
        return [results[i] for i in range(len(batch))]

    def _run_group(self, batch: list[Prepared], needs_lm: bool) -> list[Extraction]:
        device = self.loaded.device
        grid = torch.cat([item.inputs["image_grid_thw"] for item in batch])
        pixel_values = torch.cat([item.inputs["pixel_values"] for item in batch]).to(device)
        plan = merge_plans([item.plan for item in batch])
        with capturing(self._visual, self._lm, plan) as captured:
            if needs_lm:
                padded = _pad_right([item.inputs for item in batch], self._pad_token_id)
                last_hidden = self.loaded.model.model(
                    **{key: value.to(device) for key, value in padded.items()},
                    pixel_values=pixel_values,
                    image_grid_thw=grid.to(device),
                    use_cache=False,
                ).last_hidden_state
            else:
                self.loaded.model.model.get_image_features(pixel_values, grid.to(device))
        assert captured.projected is not None, "the vision tower's output hook did not fire"

        # Vision tensors cover all images of the group, in image order: split them per request.
        patches = [item.num_patches for item in batch]
        projected = captured.projected.split([n // self._merge_unit for n in patches])
        vision_tokens: Sequence[torch.Tensor] = ()
        blocks: dict[int, Sequence[torch.Tensor]] = {}
        if captured.merger_input is not None or captured.vision_blocks:
            order = window_index(self._visual, grid)
            if captured.merger_input is not None:
                vision_tokens = to_image_order(captured.merger_input, order, self._merge_unit).split(patches)
            for k, block in captured.vision_blocks.items():
                blocks[k] = to_image_order(block, order, self._merge_unit).split(patches)

        results = []
        for row, item in enumerate(batch):
            out = {names.PROJECTED_TOKENS: projected[row]}
            if vision_tokens:
                out[names.VISION_TOKENS] = vision_tokens[row]
            for k, aliases in item.plan.vision_layers.items():
                out.update(dict.fromkeys(aliases, blocks[k][row]))
            if needs_lm:
                length = item.sequence_length
                out[names.LM_LAST_HIDDEN] = last_hidden[row : row + 1, :length]
                for k, aliases in item.plan.lm_layers.items():
                    out.update(dict.fromkeys(aliases, captured.lm_layers[k][row : row + 1, :length]))
            results.append(self._finish(item, out))
        return results

    def _finish(self, item: Prepared, out: dict[str, torch.Tensor]) -> Extraction:
        """Derived outputs (image rows, pools), then one device -> host copy per tensor."""
        inputs = item.inputs
        grid = inputs["image_grid_thw"]
        lens = grid.prod(-1) // self._merge_unit
        positions = (inputs["input_ids"][0] == self._image_token_id).nonzero().flatten()
        out[names.VISUAL_TOKEN_LENS] = lens
        out[names.IMAGE_GRID_THW] = grid
        if names.LM_LAST_HIDDEN in out:
            out[names.LM_IMAGE_TOKENS] = out[names.LM_LAST_HIDDEN][0, positions.to(self.loaded.device)]
        wire = TORCH_DTYPES[item.dtype]
        arrays = {}
        for name in item.plan.names:
            tensor = _pool(name, out) if name in names.POOLED else out[name]
            if item.normalize and name in names.POOLED:
                tensor = functional.normalize(tensor, p=2.0, dim=-1)
            arrays[name] = _to_numpy(tensor, wire)
        return Extraction(
            tensors=arrays,
            visual_token_lens=lens.numpy(),
            image_grid_thw=grid.numpy(),
            image_token_positions=positions.numpy(),
            sequence_length=item.sequence_length,
        )


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


def _pool(name: str, out: dict[str, torch.Tensor]) -> torch.Tensor:
    """Pooled vector ``name`` [1, C] in float32, from the token tensors in ``out``."""
    if name == names.LM_LAST_TOKEN:
        return out[names.LM_LAST_HIDDEN][0, -1:].float()
    if name == names.LM_POOLED_MEAN:
        return out[names.LM_LAST_HIDDEN][0].float().mean(0, keepdim=True)
    source = {
        names.VISION_POOLED_MEAN: names.VISION_TOKENS,
        names.PROJECTED_POOLED_MEAN: names.PROJECTED_TOKENS,
        names.LM_IMAGE_POOLED_MEAN: names.LM_IMAGE_TOKENS,
    }[name]
    return out[source].float().mean(0, keepdim=True)


def _to_numpy(tensor: torch.Tensor, wire: torch.dtype) -> np.ndarray:
    """One device -> host copy, already in the wire dtype (integers stay int64)."""
    if not tensor.is_floating_point():
        return tensor.to(torch.int64).cpu().numpy()
    tensor = tensor.to(wire).contiguous()
    if wire == torch.bfloat16:  # numpy has no bfloat16: move the bits, view them as ml_dtypes'
        return tensor.view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16)
    return tensor.cpu().numpy()


def _release_device_memory(device: torch.device) -> None:
    """Give cached blocks back after an out-of-memory error, so the next request can run."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
