"""The benchmarks run end to end (tiny model, CPU): the GPU script stays ready to use, the throughput
table's baseline is the original script's model, and the exact-forwards bench compares the forwards
alone. Every benchmark is a module of the ``bench`` package that writes its table as a result, and
``python -m bench.render`` renders results into markdown and checks a page's tables against them."""

from __future__ import annotations

import importlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from bench import render
from bench.common import PROMPT, ROOT, Benchmark, module_command, noise_png
from bench.cpu import exact_forwards
from bench.throughput import vs_original

from qwen25vl_embed_server.core.cpu import patch_embedding
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.image_decoding import decode_image

BENCHMARKS = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts)
    for path in (ROOT / "bench").glob("*/*.py")
    if path.name not in ("__init__.py", "vllm_worker.py")  # vLLM's worker runs in vLLM's venv
)


@pytest.mark.parametrize("module", BENCHMARKS)
def test_every_benchmark_is_a_module_that_names_its_results_by_area_and_name(module: str) -> None:
    _, area, name = module.split(".")
    benchmark = importlib.import_module(module).BENCH
    assert isinstance(benchmark, Benchmark)
    assert (benchmark.module, benchmark.key) == (module, f"{area}-{name}")
    assert f"python -m {module}" in (benchmark.doc or ""), "its docstring shows how to run it"


def test_gpu_benchmark_script_runs_on_the_cpu_with_a_small_config(tmp_path: Path) -> None:
    output = tmp_path / "gpu.json"
    command = module_command("bench.gpu.throughput_7b", "--shape", "tiny", "--device", "cpu", "--dtype", "float32")
    done = subprocess.run(
        [*command, "--quick", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ("baseline (original script)", "in-process core, pooled", "service c=2, vision-only"):
        assert row in done.stdout
    assert "RPC overhead at concurrency 1" in done.stdout
    assert "TFLOP/s" in done.stdout
    result = json.loads(output.read_text())
    assert [row["row"] for row in result["rows"]][:2] == ["baseline (original script)", "in-process core, pooled"]
    assert result["summary"]["language model: TFLOP/s"] > 0
    assert result["command"].startswith("python -m bench.gpu.throughput_7b --shape tiny")


def test_the_throughput_baseline_is_transformers_own_model(tiny_model_path: Path, extractor: Extractor) -> None:
    """The original script's method runs on the model ``from_pretrained`` gives, none of our forwards in
    it, and computes what the core computes, bit for bit (fp32, one image)."""
    original = vs_original.load_original(tiny_model_path, torch.device("cpu"), torch.float32)
    ours = extractor.loaded.model.model.visual
    theirs = original.model.model.visual
    assert any("forward" in vars(module) for module in [*ours.blocks.modules(), ours.patch_embed])
    assert not any("forward" in vars(module) for module in theirs.modules())
    image = noise_png(56, 56, seed=3)
    baseline = vs_original.original_script(original, image)
    core = extractor.extract([decode_image(image)], PROMPT, extractor.plan(list(baseline)))
    for name, vector in baseline.items():
        assert np.array_equal(core.tensors[name][0], vector), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_exact_forwards_bench_compares_the_forwards_alone(tiny_model_path: Path, dtype: str) -> None:
    """Both sides in the same arithmetic (bf16: torch's bf16 kernels even where the server would choose
    float32 arithmetic), so the bits can differ only by the levers, which keep them."""
    extractors = exact_forwards.variants(dtype, list(exact_forwards.LEVERS), str(tiny_model_path))
    ours, theirs = (extractors[name].loaded.model.model.visual for name in ("ours", "transformers"))
    assert all("forward" in vars(block.attn) for block in ours.blocks)
    # Installed wherever it applies (not in bf16 where oneDNN runs AMX: core/cpu/patch_embedding.py).
    assert ("forward" in vars(ours.patch_embed)) == (patch_embedding.applies(ours.patch_embed) is None)
    assert not any("forward" in vars(module) for module in [*theirs.blocks.modules(), theirs.patch_embed])
    image = decode_image(noise_png(112, 112, seed=5))
    results = {}
    for name, extractor in extractors.items():
        assert extractor.loaded.arithmetic == "exact"
        results[name] = extractor.extract([image], PROMPT, extractor.plan(exact_forwards.OUTPUTS))
    for output in exact_forwards.OUTPUTS:
        assert np.array_equal(results["ours"].tensors[output], results["transformers"].tensors[output]), output


def _result(path: Path, rows: list[dict[str, object]], argv: list[str]) -> Path:
    benchmark = Benchmark("bench.cpu.example", "An example: ms per image.\n\nRest of the docstring.")
    parser = benchmark.parser(argv)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args([*argv, "--output", str(path)])
    return benchmark.write(args, rows, summary={"best ms/image": 12.25}, details={"not": "rendered"})


def test_a_result_holds_the_table_the_machine_the_versions_the_commit_and_the_command(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [{"variant": "plain", "ms/image": np.float64(12.25), "equal": np.bool_(True)}]
    result = json.loads(_result(tmp_path / "example.json", rows, ["--rounds", "2"]).read_text())
    assert result["benchmark"] == "cpu-example"
    assert result["title"] == "An example: ms per image."
    assert result["command"] == "python -m bench.cpu.example --rounds 2"
    assert result["rows"] == [{"variant": "plain", "ms/image": 12.25, "equal": True}]
    assert set(result["machine"]) >= {"model", "flags", "cpus"}
    assert set(result["versions"]) == {"python", "torch", "transformers", "numpy"}
    assert result["commit"]
    assert result["date"]
    assert result["details"] == {"not": "rendered"}


def test_render_writes_the_tables_between_markers_and_check_finds_stale_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results"
    rows: list[dict[str, object]] = [
        {"variant": "plain", "ms/image": 12.25, "vs plain": 1.0, "rounds ms": [12.0, 12.5]},
        {"variant": "packed", "ms/image": 9.5, "vs plain": 1.289, "rounds ms": [9.25, 9.75]},
    ]
    _result(results / "cpu-example-some-cpu.json", rows, [])

    assert render.main(["--results", str(results)]) == 0
    printed = capsys.readouterr().out
    assert "### An example: ms per image." in printed
    assert "<!-- bench:cpu-example-some-cpu -->" in printed
    assert "| variant | ms/image | vs plain | rounds ms |" in printed
    assert "| packed | 9.5 | 1.29 | 9.25, 9.75 |" in printed
    assert "- best ms/image: 12.2" in printed
    assert "- command: `python -m bench.cpu.example`" in printed

    page = tmp_path / "performance.md"
    marked = "<!-- bench:cpu-example-some-cpu -->\nan old table\n<!-- /bench:cpu-example-some-cpu -->"
    page.write_text(f"# Performance\n\nProse stays.\n\n{marked}\n\nMore prose.\n")
    assert render.main(["--results", str(results), "--check", str(page)]) == 1
    assert render.main(["--results", str(results), "--write", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Performance\n\nProse stays.\n\n<!-- bench:cpu-example-some-cpu -->\n| variant |")
    assert text.endswith("<!-- /bench:cpu-example-some-cpu -->\n\nMore prose.\n")
    assert "an old table" not in text
    assert render.main(["--results", str(results), "--check", str(page)]) == 0

    rows[1]["ms/image"] = 9.0  # measured again: the page's table is stale
    _result(results / "cpu-example-some-cpu.json", rows, [])
    assert render.main(["--results", str(results), "--check", str(page)]) == 1
    assert "cpu-example-some-cpu" in capsys.readouterr().err

    page.write_text(text.replace("cpu-example-some-cpu", "cpu-example-other-cpu"))  # no such result
    assert render.main(["--results", str(results), "--check", str(page)]) == 1


def test_the_stored_results_render() -> None:
    """Every file in bench/results/ is a result that renders (what the docs' tables come from)."""
    results = render.load(ROOT / "bench" / "results")
    assert results
    for name, result in results.items():
        assert name.startswith(result["benchmark"] + "-"), name
        assert f"`{result['command']}`" in render.block(result)
