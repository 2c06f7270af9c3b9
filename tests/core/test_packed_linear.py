"""oneDNN-packed linear layers: bit-exact in bf16, within float rounding in fp32 (opt-in).

References are transformers' own forward (``test_fidelity.Reference``) on an independently loaded
copy of the checkpoint in the same dtype, so each packed capture point is checked against what
the unpacked model computes.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from qwen25vl_embed_server.core.cpu.packed_linear import PackedLinear, PackedPatchEmbed, pack_linears, packing_applies
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model

from ..helpers import assert_batched_close, noise_image, png_bytes
from .test_fidelity import ALL_OUTPUTS, PROMPT, Reference

CPU = torch.device("cpu")
# Several attention windows per image, mixed sizes, and a multi-image prompt.
CASES = {"224x448": [(224, 448)], "three images": [(28, 28), (300, 200), (448, 224)]}
BF16_PACKED = packing_applies(CPU, torch.bfloat16)


def _linears(model: nn.Module) -> tuple[int, int]:
    """(packed, plain) linear layers of ``model``."""
    modules = list(model.modules())
    return sum(isinstance(m, PackedLinear) for m in modules), sum(isinstance(m, nn.Linear) for m in modules)


def _reference_outputs(ref: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The reference value of each capture point, in float32 (pools are float32 means)."""
    tokens = {
        "vision_tokens": ref["vision_tokens"],
        "projected_tokens": ref["projected_tokens"],
        "lm_last_hidden": ref["lm_last_hidden"],
        "lm_image_tokens": ref["lm_image_tokens"],
        "lm_layer_0": ref["lm_layers"][0],
        "vision_layer_0": ref["vision_blocks"][0],
        "vision_layer_2": ref["vision_blocks"][2],
        "vision_layer_-1": ref["vision_tokens"],
    }
    out = {name: tensor.float() for name, tensor in tokens.items()}
    out["vision_pooled_mean"] = out["vision_tokens"].mean(0, keepdim=True)
    out["projected_pooled_mean"] = out["projected_tokens"].mean(0, keepdim=True)
    out["lm_pooled_mean"] = out["lm_last_hidden"][0].mean(0, keepdim=True)
    out["lm_image_pooled_mean"] = out["lm_image_tokens"].mean(0, keepdim=True)
    out["lm_last_token"] = out["lm_last_hidden"][0, -1:]
    return out


def _run(extractor: Extractor, sizes: list[tuple[int, int]]) -> tuple[dict[str, np.ndarray], list[bytes]]:
    encoded = [png_bytes(noise_image(w, h, seed=i)) for i, (w, h) in enumerate(sizes)]
    images = [Image.open(io.BytesIO(data)).convert("RGB") for data in encoded]
    result = extractor.extract(images, PROMPT, extractor.plan(ALL_OUTPUTS))
    return result.tensors, encoded


@pytest.fixture(scope="module")
def bf16_packed(tiny_model_path: Path) -> Extractor:
    options = LoadOptions(model=str(tiny_model_path), device="cpu", dtype="bfloat16", bf16_arithmetic="native")
    return Extractor(load_model(options))


@pytest.fixture(scope="module")
def fp32_onednn(tiny_model_path: Path) -> Extractor:
    return Extractor(
        load_model(LoadOptions(model=str(tiny_model_path), device="cpu", dtype="float32", fp32_matmul="onednn"))
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 48), (3, 5, 48), (1, 1, 48)])
def test_a_packed_layer_computes_the_linear(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 80).to(dtype)
    if dtype == torch.bfloat16 and not BF16_PACKED:
        _assert_bf16_packing_is_refused_here(lambda: PackedLinear(linear))
        return
    packed = PackedLinear(linear)
    inputs = torch.randn(*shape, dtype=dtype)
    with torch.inference_mode():
        expected, actual = linear(inputs), packed(inputs)
        strided = torch.randn(48, 7, dtype=dtype).t()  # a non-contiguous input
        expected_strided, actual_strided = linear(strided), packed(strided)
    assert actual.shape == expected.shape
    assert actual.dtype == dtype
    if dtype == torch.bfloat16 and BF16_PACKED:  # torch's bf16 matmul is oneDNN's: the same sums
        assert torch.equal(actual, expected)
        assert torch.equal(actual_strided, expected_strided)
    else:
        assert_batched_close(actual.float().numpy(), expected.float().numpy())
        assert_batched_close(actual_strided.float().numpy(), expected_strided.float().numpy())
    assert (packed.in_features, packed.out_features) == (48, 80)


def _assert_bf16_packing_is_refused_here(pack: Callable[[], object]) -> None:
    """On a CPU whose oneDNN has no bf16 kernels (AVX2, or oneDNN capped to it), the packed kernel
    cannot run: the loader never packs there (:func:`packing_applies`), and oneDNN refuses."""
    assert not packing_applies(CPU, torch.bfloat16)
    with pytest.raises(RuntimeError, match="bf16 path needs the cpu support"):
        pack()


def test_packing_applies_to_cpu_models_only_and_fp32_on_request() -> None:
    assert not packing_applies(CPU, torch.float32)
    assert packing_applies(CPU, torch.float32, "onednn") == torch.backends.mkldnn.is_available()
    assert bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) == BF16_PACKED
    assert not packing_applies(torch.device("cuda"), torch.bfloat16)
    assert not packing_applies(CPU, torch.float16)
    with pytest.raises(ValueError, match="unknown fp32 matmul 'fast'"):
        LoadOptions(model="tiny-random", fp32_matmul="fast")


def test_every_linear_but_the_unused_lm_head_is_packed(tiny_model_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    plain = _linears(model)[1]
    assert pack_linears(model) == plain - 1
    assert _linears(model) == (plain - 1, 1)
    assert isinstance(model.lm_head, nn.Linear)


def test_the_default_fp32_model_is_not_packed(extractor: Extractor) -> None:
    packed, plain = _linears(extractor.loaded.model)
    assert packed == 0
    assert plain > 0


@pytest.mark.parametrize("sizes", list(CASES.values()), ids=list(CASES))
def test_bf16_packed_capture_points_equal_transformers_bf16(
    bf16_packed: Extractor, tiny_model_path: Path, sizes: list[tuple[int, int]]
) -> None:
    assert (_linears(bf16_packed.loaded.model)[0] > 0) == BF16_PACKED
    assert bf16_packed.info().arithmetic == "exact"
    tensors, encoded = _run(bf16_packed, sizes)
    expected = _reference_outputs(Reference(tiny_model_path, torch.bfloat16).run(encoded, PROMPT))
    for name, value in expected.items():
        np.testing.assert_array_equal(tensors[name], value.numpy(), err_msg=name)


@pytest.mark.parametrize("sizes", list(CASES.values()), ids=list(CASES))
def test_fp32_onednn_capture_points_are_within_rounding_of_transformers(
    fp32_onednn: Extractor, tiny_model_path: Path, sizes: list[tuple[int, int]]
) -> None:
    assert _linears(fp32_onednn.loaded.model)[0] > 0
    assert fp32_onednn.info().arithmetic == "fp32-onednn"
    tensors, encoded = _run(fp32_onednn, sizes)
    expected = _reference_outputs(Reference(tiny_model_path).run(encoded, PROMPT))
    for name, value in expected.items():
        assert_batched_close(tensors[name], value.numpy(), name)


def test_a_packed_retrieval_head_gives_the_same_vectors(colqwen_adapter: Path, colqwen: Extractor) -> None:
    packed = Extractor(
        load_model(LoadOptions(model=str(colqwen_adapter), device="cpu", dtype="float32", fp32_matmul="onednn"))
    )
    assert isinstance(packed.loaded.head, PackedLinear)
    assert packed.retrieval_dim == colqwen.retrieval_dim
    image = noise_image(224, 224)
    name = colqwen.info().default_outputs[0]
    ours = packed.extract([image], plan=packed.plan([name])).tensors[name]
    exact = colqwen.extract([image], plan=colqwen.plan([name])).tensors[name]
    assert_batched_close(ours, exact, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_packed_patch_embedding_computes_the_convolution(fp32_onednn: Extractor, dtype: torch.dtype) -> None:
    """transformers' Conv3d patch embedding, as one matmul on the processor's rows."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed

    assert isinstance(fp32_onednn.loaded.visual.patch_embed, PackedPatchEmbed)
    torch.manual_seed(0)
    reference = Qwen2_5_VisionPatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=32).to(dtype)
    if dtype == torch.bfloat16 and not BF16_PACKED:
        _assert_bf16_packing_is_refused_here(lambda: PackedPatchEmbed(reference))
        return
    packed = PackedPatchEmbed(reference)
    rows = torch.randn(50, 3 * 2 * 14 * 14)  # float32, as the processor gives them
    with torch.inference_mode():
        expected, actual = reference(rows), packed(rows)
    assert actual.shape == expected.shape == (50, 32)
    assert actual.dtype == expected.dtype == dtype
    assert_batched_close(actual.float().numpy(), expected.float().numpy())
