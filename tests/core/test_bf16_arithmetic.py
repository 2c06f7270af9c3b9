"""bf16 in float32 arithmetic: each op rounds once from a float32 sum, and the model stays within
bf16 rounding of the float32 result.

Op references are float64 computations on the same bf16 values; model references are
transformers' own forward (``test_fidelity.Reference``) in float32 and in bf16, on independently
loaded copies of the checkpoint. A widened model is as far from float32 as transformers' bf16 is:
its error against the float32 reference is bounded by transformers' bf16 error (times two, as
rounding differences propagate through the layers in either direction) or one bf16 rounding step.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed

from qwen25vl_embed_server.core.cpu import bf16_arithmetic
from qwen25vl_embed_server.core.cpu.bf16_arithmetic import ATTENTION, Float32Linear, Float32PatchEmbed, applies, attend
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model

from ..helpers import noise_image, png_bytes
from .test_fidelity import PROMPT, Reference
from .test_packed_linear import CASES, _reference_outputs, _run

CPU = torch.device("cpu")
BF16_STEP = 2.0**-7  # bf16's spacing relative to a value, at most: 8 significant bits
GENERATOR_SEED = 0
# oneDNN's ISA caps below the first with bf16 instructions (AVX-512 BW/VL/DQ, or AVX-NE-CONVERT).
ONEDNN_CAPS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI"}


def _relative_error(value: Any, reference: Any) -> float:
    wide = np.asarray(reference, np.float64)
    return float(np.abs(np.asarray(value, np.float64) - wide).max() / np.abs(wide).max())


def _assert_rounded_once(actual: torch.Tensor, exact: torch.Tensor) -> None:
    """``actual`` (bf16) is ``exact`` (float64) rounded to bf16: within half a step, plus the float32
    sum's own rounding (far below a bf16 step)."""
    assert actual.dtype == torch.bfloat16
    error = (actual.double() - exact).abs()
    bound = exact.abs() * (BF16_STEP / 2) * (1 + 1e-3) + 1e-6 * float(exact.abs().max())
    assert bool((error <= bound).all()), float((error / exact.abs().clamp_min(1e-30)).max())


def _assert_within_one_step(actual: torch.Tensor, other: torch.Tensor) -> None:
    """Two bf16 roundings of nearly the same sum: equal, or one bf16 step apart."""
    difference = (actual.float() - other.float()).abs()
    bound = other.float().abs() * BF16_STEP * (1 + 1e-3) + 1e-6 * float(other.float().abs().max())
    assert bool((difference <= bound).all())


@pytest.mark.parametrize("shape", [(7, 48), (3, 5, 48), (1, 1, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_a_float32_linear_rounds_the_float32_matmul_once(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(GENERATOR_SEED)
    linear = nn.Linear(48, 40, bias=bias).to(torch.bfloat16)
    inputs = torch.randn(shape).to(torch.bfloat16)
    widened = Float32Linear(linear)
    assert widened.weight is linear.weight  # the bf16 parameter stays: memory unchanged
    with torch.inference_mode():
        actual, native = widened(inputs), linear(inputs)
        b = None if linear.bias is None else linear.bias.double()
        exact = functional.linear(inputs.double(), linear.weight.double(), b)
    _assert_rounded_once(actual, exact)
    _assert_within_one_step(actual, native)
    assert actual.shape == native.shape


def test_attend_rounds_the_float32_attention_once() -> None:
    generator = torch.Generator().manual_seed(GENERATOR_SEED)
    query, key, value = (torch.randn(3, 2, 40, 16, generator=generator).to(torch.bfloat16) for _ in range(3))
    with torch.inference_mode():
        actual = attend(query, key, value, dropout_p=0.0, scale=0.25)
        exact = functional.scaled_dot_product_attention(query.double(), key.double(), value.double(), scale=0.25)
        native = functional.scaled_dot_product_attention(query, key, value, scale=0.25)
    _assert_rounded_once(actual, exact)
    # torch's bf16 kernel rounds the softmax weights to bf16 before the second product: no closer.
    assert float((actual.double() - exact).abs().max()) <= float((native.double() - exact).abs().max())


def test_the_float32_patch_embedding_rounds_the_convolution_once() -> None:
    torch.manual_seed(GENERATOR_SEED)
    stock = Qwen2_5_VisionPatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=32)
    stock = stock.to(torch.bfloat16)
    widened = Float32PatchEmbed(stock)
    rows = torch.randn(50, 3 * 2 * 14 * 14)  # float32, as the processor gives them
    wide = Qwen2_5_VisionPatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=32).double()
    wide.load_state_dict(stock.state_dict())
    with torch.inference_mode():
        actual = widened(rows)
        exact = wide(rows.to(torch.bfloat16).double())  # the rows rounded to bf16, as transformers does
        native = stock(rows)
    assert actual.shape == native.shape == (50, 32)
    _assert_rounded_once(actual, exact)
    _assert_within_one_step(actual, native)


def test_a_patch_embedding_that_is_not_patch_wise_is_refused() -> None:
    embed = Qwen2_5_VisionPatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=32)
    embed.proj = nn.Conv3d(3, 32, kernel_size=(2, 14, 14), stride=(1, 7, 7))
    with pytest.raises(ValueError, match="patch-wise"):
        Float32PatchEmbed(embed)


@pytest.mark.parametrize(
    ("choice", "has_bf16", "expected"),
    [("auto", False, True), ("auto", True, False), ("float32", True, True), ("native", False, False)],
)
def test_auto_widens_only_where_the_cpu_has_no_bf16_dot_products(
    monkeypatch: pytest.MonkeyPatch, choice: str, has_bf16: bool, expected: bool
) -> None:
    monkeypatch.setattr(bf16_arithmetic, "cpu_has_bf16_dot_products", lambda: has_bf16)
    assert applies(choice, CPU, torch.bfloat16) is expected
    assert not applies(choice, CPU, torch.float32)
    assert not applies(choice, torch.device("cuda"), torch.bfloat16)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="the kernel's CPU flags are Linux's")
def test_the_cpu_is_read_as_the_kernel_reports_it() -> None:
    flags = set().union(
        *(
            line.split(":")[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    )
    has = "avx512_bf16" in flags or "amx_bf16" in flags
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper() in ONEDNN_CAPS_WITHOUT_BF16
    assert bf16_arithmetic.cpu_has_bf16_dot_products() is (has and not capped)


def test_onednn_capped_to_avx2_counts_as_a_cpu_without_bf16_dot_products() -> None:
    """torch's bf16 matmuls are oneDNN's: capped to AVX2 they run as on an AVX2 CPU, so ``auto``
    widens there, whatever the CPU has (a child process: the cap is read when oneDNN loads)."""
    probe = (
        "import qwen25vl_embed_server, torch\n"
        "from qwen25vl_embed_server.core.cpu import bf16_arithmetic as b\n"
        "print(b.cpu_has_bf16_dot_products(), b.applies('auto', torch.device('cpu'), torch.bfloat16))\n"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]


def test_an_unknown_arithmetic_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown bf16 arithmetic 'fast'; expected one of auto, native, float32"):
        applies("fast", CPU, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown bf16 arithmetic 'fast'"):
        LoadOptions(model="tiny-random", bf16_arithmetic="fast")


@pytest.fixture(scope="module")
def widened(tiny_model_path: Path) -> Extractor:
    options = LoadOptions(model=str(tiny_model_path), device="cpu", dtype="bfloat16", bf16_arithmetic="float32")
    return Extractor(load_model(options))


def test_every_dot_product_of_the_model_is_widened(widened: Extractor) -> None:
    model = widened.loaded.model
    plain = [name for name, m in model.named_modules() if type(m) is nn.Linear and not name.endswith("lm_head")]
    assert plain == []
    assert sum(isinstance(m, Float32Linear) for m in model.modules()) > 0
    assert isinstance(widened.loaded.visual.patch_embed, Float32PatchEmbed)
    assert widened.loaded.language_model.config._attn_implementation == ATTENTION
    for layer in widened.loaded.language_model.layers:  # what each attention reads at every call
        assert layer.self_attn.config._attn_implementation == ATTENTION
    for block in widened.loaded.visual.blocks:
        forward = vars(block.attn)["forward"]
        assert isinstance(forward, functools.partial)
        assert forward.keywords["attend"] is attend
    assert next(model.parameters()).dtype == torch.bfloat16
    assert widened.info().arithmetic == "bf16-float32"


@pytest.mark.parametrize("sizes", list(CASES.values()), ids=list(CASES))
def test_capture_points_are_within_bf16_rounding_of_float32(
    widened: Extractor, tiny_model_path: Path, sizes: list[tuple[int, int]]
) -> None:
    tensors, encoded = _run(widened, sizes)
    exact = _reference_outputs(Reference(tiny_model_path).run(encoded, PROMPT))
    native = _reference_outputs(Reference(tiny_model_path, torch.bfloat16).run(encoded, PROMPT))
    for name, value in exact.items():
        assert tensors[name].shape == tuple(value.shape), name
        bound = max(2 * _relative_error(native[name].numpy(), value.numpy()), BF16_STEP)
        assert _relative_error(tensors[name], value.numpy()) <= bound, name


def test_batched_requests_stay_within_bf16_rounding(widened: Extractor, tiny_model_path: Path) -> None:
    """Requests of different sizes run as one batch, each against float32 transformers alone."""
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate([(224, 448), (300, 200), (56, 56)])]
    plan = widened.plan(["projected_tokens", "lm_last_hidden"])
    results = widened.run([widened.prepare([image], PROMPT, plan) for image in images])
    exact, native = Reference(tiny_model_path), Reference(tiny_model_path, torch.bfloat16)
    for image, result in zip(images, results, strict=True):
        encoded = [png_bytes(image)]
        wide, rounded = exact.run(encoded, PROMPT), native.run(encoded, PROMPT)
        for name in ("projected_tokens", "lm_last_hidden"):
            reference = wide[name].float().numpy()
            bound = max(2 * _relative_error(rounded[name].float().numpy(), reference), BF16_STEP)
            assert _relative_error(result.tensors[name], reference.reshape(result.tensors[name].shape)) <= bound


def test_a_retrieval_model_is_widened_with_its_head(colqwen_adapter: Path, colqwen: Extractor) -> None:
    def load(arithmetic: str) -> Extractor:
        options = LoadOptions(model=str(colqwen_adapter), device="cpu", dtype="bfloat16", bf16_arithmetic=arithmetic)
        return Extractor(load_model(options))

    widened_colqwen, native_colqwen = load("float32"), load("native")
    assert isinstance(widened_colqwen.loaded.head, Float32Linear)
    image = noise_image(224, 224)
    name = colqwen.info().default_outputs[0]
    exact = colqwen.extract([image], plan=colqwen.plan([name])).tensors[name]
    ours = widened_colqwen.extract([image], plan=widened_colqwen.plan([name])).tensors[name]
    rounded = native_colqwen.extract([image], plan=native_colqwen.plan([name])).tensors[name]
    assert ours.shape == exact.shape
    assert _relative_error(ours, exact) <= max(2 * _relative_error(rounded, exact), BF16_STEP)
