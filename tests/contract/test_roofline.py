"""``bench.cpu.roofline`` counts the work it puts a floor under: every linear call, every attended pair.

The counts are checked against ones derived independently, from the tiny model's parameters and
config and the request's own sizes, so a call the recorder missed or miscounted fails here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from bench.common import ROOT, module_command
from bench.cpu import roofline
from PIL import Image
from torch import nn

from qwen25vl_embed_server.core.model.extractor import Extractor, Prepared


def _brute_force_pairs(queries: int, keys: int, heads: int, allowed: torch.Tensor | None, causal: bool) -> int:
    count = 0
    for i in range(queries):
        for j in range(keys):
            if allowed is not None:
                count += bool(allowed[i, j])
            else:
                count += (not causal) or j <= i
    return heads * count


@pytest.mark.parametrize(("queries", "keys"), [(5, 5), (3, 7), (7, 3)])
def test_attended_pairs_match_counting_each_pair(queries: int, keys: int) -> None:
    query, key = torch.zeros(2, 3, queries, 8), torch.zeros(2, 3, keys, 8)
    assert roofline.attended_pairs(query, key, None, False) == _brute_force_pairs(queries, keys, 6, None, False)
    assert roofline.attended_pairs(query, key, None, True) == _brute_force_pairs(queries, keys, 6, None, True)
    allowed = torch.rand(queries, keys, generator=torch.Generator().manual_seed(queries * keys)) > 0.5
    expected = _brute_force_pairs(queries, keys, 6, allowed, False)
    assert roofline.attended_pairs(query, key, allowed, False) == expected  # boolean mask, broadcast over heads
    for masked in (float("-inf"), torch.finfo(torch.float32).min):  # additive masks, as transformers builds them
        additive = torch.zeros(queries, keys).masked_fill(~allowed, masked)
        assert roofline.attended_pairs(query, key, additive, False) == expected


def _one_image(extractor: Extractor, seed: int) -> Prepared:
    """One 448x448 noise image (several attention windows) asking for vision and LM states."""
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (448, 448, 3), dtype=np.uint8))
    return extractor.prepare([image], "Describe the image.", extractor.plan(["vision_tokens", "lm_last_hidden"]))


def test_record_sees_every_linear_call_and_every_attended_pair(extractor: Extractor) -> None:
    prepared = _one_image(extractor, 0)
    groups, attention = roofline.record(extractor, [prepared])

    model = extractor.loaded.model
    config = model.config
    tokens = prepared.sequence_length
    patches = int(prepared.inputs["image_grid_thw"].prod())
    merged = patches // config.vision_config.spatial_merge_size**2
    rows = {"model.visual.blocks.": patches, "model.visual.merger.": merged, "model.language_model.": tokens}
    expected = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":  # the extractor reads hidden states, not logits
            expected += 2 * next(n for prefix, n in rows.items() if name.startswith(prefix)) * module.weight.numel()
    assert sum(call.flops for group in groups for call in group) == expected

    text = config.text_config
    per_layer = [len(group) for group in groups if group[0].rows == tokens]
    assert per_layer == [3, 1, 2, 1] * text.num_hidden_layers  # q k v on one input; o; gate up; down

    vision = config.vision_config
    heads, side = vision.num_heads, vision.window_size // vision.patch_size  # 448 px: whole windows only
    full = len(vision.fullatt_block_indexes)
    vision_pairs = full * heads * patches**2 + (vision.depth - full) * heads * patches * side**2
    lm_pairs = text.num_hidden_layers * text.num_attention_heads * tokens * (tokens + 1) // 2
    assert sum(call.pairs for call in attention) == vision_pairs + lm_pairs


def test_the_pinned_kernels_are_every_product_and_the_patch_convolution(extractor: Extractor) -> None:
    prepared = _one_image(extractor, 1)
    groups, attention = roofline.record(extractor, [prepared])
    share, calls = roofline.pinned_kernels(extractor, [prepared])
    # Every linear call and every attention call reached a pinned kernel, and so did the one
    # convolution of the patch embedding: a kernel the set misses (or a renamed one) fails here.
    assert calls == sum(len(group) for group in groups) + len(attention) + 1
    assert 0 < share < 1  # the kernels' own time is part of the forward's


def test_the_script_prints_the_floor_and_judges_a_target_against_it(tmp_path: Path) -> None:
    command = module_command("bench.cpu.roofline", "--shape", "tiny", "--dtypes", "float32", "--rounds", "1")
    done = subprocess.run(
        [*command, "--repeats", "1", "--peer-images-per-s", "1e9", "--output", str(tmp_path / "roofline.json")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GFLOP/image, floor" in done.stdout
    assert "model / floor" in done.stdout
    # 1.25x of a billion images/s is under a nanosecond per image: below any floor.
    assert "below the floor: no implementation reaches it" in done.stdout
    assert "at transformers' bits: the pinned kernels" in done.stdout
    assert "below what the pinned kernels take alone: no exact implementation reaches it" in done.stdout
    (row,) = json.loads((tmp_path / "roofline.json").read_text())["rows"]
    assert row["dtype"] == "float32"
    assert row["model / floor"] > 0
