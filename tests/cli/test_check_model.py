"""``check-model``: what loading found, one image and one text through the model, and exit 2 with
one line for a checkpoint the server would refuse."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwen25vl_embed_server.cli import main

from ..core.test_load_strictness import _edit_weights
from ..helpers import noise_image


def test_a_plain_checkpoint_is_described_and_runs(tiny_model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-model", str(tiny_model_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"model: {tiny_model_path}"
    assert "architecture: Qwen2_5_VLForConditionalGeneration (qwen2_5_vl)" in out
    assert "device: cpu, dtype: float32, arithmetic: exact" in out
    assert "recipe: none (raw states) (a plain checkpoint)" in out
    assert f"base: {tiny_model_path}" in out
    # The sizes and the pixel range as the folder's own files state them.
    config = json.loads((tiny_model_path / "config.json").read_text())
    vision, text = config["vision_config"], config["text_config"]
    assert (
        f"sizes: vision {vision['hidden_size']} x {vision['depth']} blocks, "
        f"language model {text['hidden_size']} x {text['num_hidden_layers']} layers"
    ) in out
    image = json.loads((tiny_model_path / "processor_config.json").read_text())["image_processor"]
    assert (
        f"processor: {image['size']['shortest_edge']} to {image['size']['longest_edge']} pixels per image, "
        f"patch {image['patch_size']}, merge {image['merge_size']}"
    ) in out
    assert any(
        re.fullmatch(rf"weights \(checkpoint {tiny_model_path}\): \d+ matched; every weight", line) for line in out
    )
    assert any(line.startswith("one image: ") and "visual_token_lens [1]" in line for line in out)
    assert "one text: lm_pooled_mean [1, 64], lm_last_token [1, 64]" in out
    assert out[-1] == f"ok: serve --model {tiny_model_path}"


def test_a_retrieval_adapter_names_its_recipe_base_and_adapter(
    colqwen_adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-model", str(colqwen_adapter), "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("recipe: colqwen2.5 (") for line in out)
    assert f"adapter: {colqwen_adapter}" in out
    assert sum(line.startswith("weights (") and line.endswith("every weight") for line in out) == 2
    assert any(re.fullmatch(r"one image: multi_vector \[\d+, 128\]", line) for line in out)
    assert any(re.fullmatch(r"one text: multi_vector \[\d+, 128\]", line) for line in out)


def test_a_checkpoint_missing_a_weight_exits_2_in_one_line(
    tiny_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model_path, partial)
    _edit_weights(partial / "model.safetensors", {"model.norm.weight": None})
    assert main(["check-model", str(partial), "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    # One line says why (transformers' loading bar may stand before it at the default log level).
    (line,) = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert captured.err.endswith(line + "\n")
    assert "1 missing (newly initialised): model.language_model.norm.weight" in line
    assert "--allow-partial-weights" in line
    # With the flag it loads, and says which weight was not filled.
    assert main(["check-model", str(partial), "--device", "cpu", "--allow-partial-weights"]) == 0
    assert "1 missing (newly initialised)" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["serve", "extract"])
def test_serve_and_extract_refuse_a_partly_random_model_in_one_line(
    command: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    """As the user meets it: a process of its own, its stderr one line, exit 2, nothing written."""
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model_path, partial)
    _edit_weights(partial / "model.safetensors", {"model.norm.weight": None})
    image = tmp_path / "cat.png"
    noise_image(56, 56).save(image)
    argv = {
        "serve": ["serve", "--model", str(partial), "--port", "0", "--metrics-port", "0"],
        "extract": ["extract", str(image), "--outdir", str(tmp_path / "out"), "--model", str(partial)],
    }[command]
    cli = [sys.executable, "-m", "qwen25vl_embed_server.cli", "--log-level", "warning"]
    done = subprocess.run([*cli, *argv, "--device", "cpu"], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr == (
        f"error: cannot load model '{partial}': checkpoint {partial}: "
        "1 missing (newly initialised): model.language_model.norm.weight; "
        "refusing to serve a partly random model (--allow-partial-weights loads it anyway)\n"
    )
    assert not (tmp_path / "out").exists()
