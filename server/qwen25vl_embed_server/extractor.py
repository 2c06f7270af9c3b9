"""The extraction core: run Qwen2.5-VL on one request and return its outputs as named arrays.

No gRPC here: callers get numpy arrays in the wire dtype they asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import torch
from PIL import Image
from torch.nn import functional

from . import outputs as names
from .capture import capturing
from .errors import InvalidInputError
from .loading import LoadedModel
from .outputs import OutputPlan, available_outputs, plan_outputs
from .preprocess import DEFAULT_PROMPT, prepare_inputs
from .window_order import to_image_order, window_index

_WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    """Runs one request at a time on a loaded model. Not thread-safe: give it one owner thread."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self._visual = loaded.visual
        self._lm = loaded.language_model
        self._merge_unit = int(self._visual.spatial_merge_size) ** 2
        self._image_token_id = int(loaded.model.config.image_token_id)
        self.num_lm_layers = len(self._lm.layers)
        self.num_vision_layers = len(self._visual.blocks)

    @property
    def outputs(self) -> tuple[str, ...]:
        return available_outputs(self.num_lm_layers, self.num_vision_layers)

    def plan(self, requested: Sequence[str]) -> OutputPlan:
        """Validate output names for this model (raises :class:`InvalidInputError`)."""
        return plan_outputs(tuple(requested), self.num_lm_layers, self.num_vision_layers)

    def extract(
        self,
        images: Sequence[Image.Image],
        prompt: str = DEFAULT_PROMPT,
        plan: OutputPlan | None = None,
        dtype: str = "float32",
        normalize: bool = False,
    ) -> Extraction:
        """Run the model on ``images`` (one multi-image prompt) and ``prompt``.

        Only what ``plan`` needs runs: without LM outputs the language model is skipped. Pooled
        vectors are means computed in float32; ``normalize`` L2-normalises them.
        """
        plan = plan or self.plan(())
        if dtype not in _WIRE_DTYPES:
            raise InvalidInputError(f"unknown dtype {dtype!r}; expected one of {', '.join(_WIRE_DTYPES)}")
        inputs = prepare_inputs(self.loaded.processor, images, prompt)
        with torch.inference_mode():
            tensors = self._run(inputs.to(self.loaded.device), plan, normalize)
            grid = inputs["image_grid_thw"]
            positions = (inputs["input_ids"][0] == self._image_token_id).nonzero().flatten()
            wire = _WIRE_DTYPES[dtype]
            arrays = {name: _to_numpy(tensors[name], wire) for name in plan.names}
        return Extraction(
            tensors=arrays,
            visual_token_lens=(grid.prod(-1) // self._merge_unit).numpy(),
            image_grid_thw=grid.numpy(),
            image_token_positions=positions.numpy(),
            sequence_length=int(inputs["input_ids"].shape[1]),
        )

    def _run(self, inputs: dict[str, torch.Tensor], plan: OutputPlan, normalize: bool) -> dict[str, torch.Tensor]:
        """Forward with captures; returns every requested output as a device tensor."""
        grid = inputs["image_grid_thw"]
        with capturing(self._visual, self._lm, plan) as captured:
            if plan.needs_lm:
                last_hidden = self.loaded.model.model(
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"],
                    mm_token_type_ids=inputs["mm_token_type_ids"],
                    pixel_values=inputs["pixel_values"],
                    image_grid_thw=grid,
                    use_cache=False,
                ).last_hidden_state
            else:
                self.loaded.model.model.get_image_features(inputs["pixel_values"], grid)
        assert captured.projected is not None, "the vision tower's output hook did not fire"
        out: dict[str, torch.Tensor] = {
            names.PROJECTED_TOKENS: captured.projected,
            names.VISUAL_TOKEN_LENS: grid.prod(-1) // self._merge_unit,
            names.IMAGE_GRID_THW: grid,
        }
        if plan.vision_layers or captured.merger_input is not None:
            order = window_index(self._visual, grid)
            if captured.merger_input is not None:
                out[names.VISION_TOKENS] = to_image_order(captured.merger_input, order, self._merge_unit)
            for k, aliases in plan.vision_layers.items():
                for alias in aliases:
                    out[alias] = to_image_order(captured.vision_blocks[k], order, self._merge_unit)
        for k, aliases in plan.lm_layers.items():
            for alias in aliases:
                out[alias] = captured.lm_layers[k]
        if plan.needs_lm:
            positions = (inputs["input_ids"][0] == self._image_token_id).nonzero().flatten()
            out[names.LM_LAST_HIDDEN] = last_hidden
            out[names.LM_IMAGE_TOKENS] = last_hidden[0, positions]
        for name in plan.names:
            if name in names.POOLED:
                vector = _pool(name, out)
                out[name] = functional.normalize(vector, p=2.0, dim=-1) if normalize else vector
        return out


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
    tensor = tensor.to(wire)
    if wire == torch.bfloat16:  # numpy has no bfloat16: move the bits, view them as ml_dtypes'
        return tensor.view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16)
    return tensor.cpu().numpy()
