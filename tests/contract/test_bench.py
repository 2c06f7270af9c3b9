"""The benchmark scripts run end to end (tiny model, CPU): the GPU script stays ready to use, the
throughput table's baseline is the original script's model, and the exact-forwards bench compares
the forwards alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).parents[2] / "bench"
sys.path.insert(0, str(BENCH))  # bench/ holds scripts, not a package
import exact_forwards  # noqa: E402
import throughput  # noqa: E402

from qwen25vl_embed_server.core import patch_embedding  # noqa: E402
from qwen25vl_embed_server.core.extractor import Extractor  # noqa: E402
from qwen25vl_embed_server.core.image_decoding import decode_image  # noqa: E402


def test_gpu_benchmark_script_runs_on_the_cpu_with_a_small_config() -> None:
    command = [sys.executable, str(BENCH / "gpu_7b.py"), "--shape", "tiny", "--device", "cpu"]
    done = subprocess.run(
        [*command, "--dtype", "float32", "--quick"], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ("baseline (original script)", "in-process core, pooled", "service c=2, vision-only"):
        assert row in done.stdout
    assert "RPC overhead at concurrency 1" in done.stdout
    assert "TFLOP/s" in done.stdout


def test_the_throughput_baseline_is_transformers_own_model(tiny_model_path: Path, extractor: Extractor) -> None:
    """The original script's method runs on the model ``from_pretrained`` gives, none of our forwards in
    it, and computes what the core computes, bit for bit (fp32, one image)."""
    original = throughput.load_original(tiny_model_path, torch.device("cpu"), torch.float32)
    ours = extractor.loaded.model.model.visual
    theirs = original.model.model.visual
    assert any("forward" in vars(module) for module in [*ours.blocks.modules(), ours.patch_embed])
    assert not any("forward" in vars(module) for module in theirs.modules())
    image = throughput.noise_png(56, seed=3)
    baseline = throughput.original_script(original, image)
    core = extractor.extract([decode_image(image)], throughput.PROMPT, extractor.plan(list(baseline)))
    for name, vector in baseline.items():
        assert np.array_equal(core.tensors[name][0], vector), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_exact_forwards_bench_compares_the_forwards_alone(tiny_model_path: Path, dtype: str) -> None:
    """Both sides in the same arithmetic (bf16: torch's bf16 kernels even where the server would choose
    float32 arithmetic), so the bits can differ only by the levers, which keep them."""
    extractors = exact_forwards.variants(dtype, list(exact_forwards.LEVERS), str(tiny_model_path))
    ours, theirs = (extractors[name].loaded.model.model.visual for name in ("ours", "transformers"))
    assert all("forward" in vars(block.attn) for block in ours.blocks)
    # Installed wherever it applies (not in bf16 where oneDNN runs AMX: core/patch_embedding.py).
    assert ("forward" in vars(ours.patch_embed)) == (patch_embedding.applies(ours.patch_embed) is None)
    assert not any("forward" in vars(module) for module in [*theirs.blocks.modules(), theirs.patch_embed])
    image = decode_image(throughput.noise_png(112, seed=5))
    results = {}
    for name, extractor in extractors.items():
        assert extractor.loaded.arithmetic == "exact"
        results[name] = extractor.extract([image], throughput.PROMPT, extractor.plan(exact_forwards.OUTPUTS))
    for output in exact_forwards.OUTPUTS:
        assert np.array_equal(results["ours"].tensors[output], results["transformers"].tensors[output]), output
