"""The extraction core without gRPC: planning, compute-only-what-is-needed, hook hygiene, dtypes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch

from qwen25vl_embed_server.core.errors import InvalidInputError
from qwen25vl_embed_server.core.model.extractor import Extractor, Prepared
from qwen25vl_embed_server.core.model.output_settings import OutputSettings
from qwen25vl_embed_server.core.model.outputs import DEFAULT_OUTPUTS

from ..helpers import noise_image


@contextmanager
def counting_calls(module: torch.nn.Module) -> Iterator[list[int]]:
    """Count forward calls of a real module (observes; changes nothing)."""
    calls: list[int] = []
    handle = module.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def _hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_vision_only_outputs_never_run_the_language_model(extractor: Extractor) -> None:
    plan = extractor.plan(["vision_tokens", "projected_tokens", "vision_pooled_mean", "vision_layer_1"])
    assert not plan.needs_lm
    with (
        counting_calls(extractor.loaded.language_model) as lm_calls,
        counting_calls(extractor.loaded.visual) as vision_calls,
    ):
        extractor.extract([noise_image(224, 224)], plan=plan)
    assert lm_calls == []
    assert vision_calls == [1]


def test_lm_outputs_run_each_stage_once_and_never_lm_head(extractor: Extractor) -> None:
    plan = extractor.plan(["vision_tokens", "lm_last_hidden", "lm_layer_1"])
    model = extractor.loaded.model
    with (
        counting_calls(model.lm_head) as head,
        counting_calls(model.model.language_model) as lm,
        counting_calls(model.model.visual) as vision,
    ):
        extractor.extract([noise_image(224, 224)], plan=plan)
    assert (head, lm, vision) == ([], [1], [1])


def test_hooks_are_removed_even_when_the_forward_fails(extractor: Extractor) -> None:
    model = extractor.loaded.model
    before = _hook_count(model)
    plan = extractor.plan(["vision_tokens", "vision_layer_0", "lm_layer_0", "lm_last_hidden"])
    pixel_values = torch.zeros(7, 3)  # wrong shape: the patch embedding raises
    bad: dict[str, Any] = {
        "input_ids": torch.zeros(1, 4, dtype=torch.long),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
        "mm_token_type_ids": torch.zeros(1, 4, dtype=torch.long),
        "pixel_values": pixel_values,
        "image_grid_thw": torch.tensor([[1, 2, 2]]),
    }
    with pytest.raises(RuntimeError):
        extractor.run([Prepared(inputs=bad, plan=plan)])
    assert _hook_count(model) == before


def test_plan_validates_names_and_layers(extractor: Extractor) -> None:
    assert extractor.plan([]).names == DEFAULT_OUTPUTS
    plan = extractor.plan(["lm_layer_-1", "lm_layer_1", "vision_layer_-4", "lm_layer_1"])
    assert plan.names == ("lm_layer_-1", "lm_layer_1", "vision_layer_-4")
    assert plan.lm_layers == {1: ("lm_layer_-1", "lm_layer_1")}
    assert plan.vision_layers == {0: ("vision_layer_-4",)}
    with pytest.raises(InvalidInputError, match="unknown output 'pooled'"):
        extractor.plan(["pooled"])
    with pytest.raises(InvalidInputError, match=r"lm_layer_2.*out of range for 2 lm layers"):
        extractor.plan(["lm_layer_2"])
    with pytest.raises(InvalidInputError, match="vision_layer_-5"):
        extractor.plan(["vision_layer_-5"])


def test_layer_aliases_return_the_same_tensor(extractor: Extractor) -> None:
    result = extractor.extract([noise_image(100, 80)], plan=extractor.plan(["lm_layer_-1", "lm_layer_1"]))
    np.testing.assert_array_equal(result.tensors["lm_layer_-1"], result.tensors["lm_layer_1"])


@pytest.mark.parametrize(("dtype", "numpy_dtype"), [("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)])
def test_half_wire_dtypes_are_the_rounded_float32_values(extractor: Extractor, dtype: str, numpy_dtype: Any) -> None:
    plan = extractor.plan(["projected_tokens", "lm_pooled_mean", "visual_token_lens"])
    image = [noise_image(140, 112)]
    full = extractor.extract(image, plan=plan).tensors
    half = extractor.extract(image, plan=plan, settings=OutputSettings(dtype=dtype)).tensors
    for name in ("projected_tokens", "lm_pooled_mean"):
        assert half[name].dtype == np.dtype(numpy_dtype)
        np.testing.assert_array_equal(half[name], full[name].astype(numpy_dtype))
    assert half["visual_token_lens"].dtype == np.int64


def test_unknown_dtype_and_image_outputs_of_text_are_invalid_input(extractor: Extractor) -> None:
    with pytest.raises(InvalidInputError, match="unknown dtype 'int8'"):
        extractor.extract([noise_image(56, 56)], settings=OutputSettings(dtype="int8"))
    with pytest.raises(InvalidInputError, match="no image, so it has no projected_tokens, visual_token_lens;"):
        extractor.plan(["lm_last_token", "projected_tokens", "visual_token_lens"], has_images=False)


def test_extreme_aspect_ratio_is_invalid_input(extractor: Extractor) -> None:
    with pytest.raises(InvalidInputError, match=r"processor rejected.*3000x10"):
        extractor.extract([noise_image(3000, 10)])
