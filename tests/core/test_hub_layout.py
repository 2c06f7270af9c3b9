"""A checkpoint in the layout Qwen/Qwen2.5-VL-3B/7B-Instruct are published in loads and runs exactly
as the same weights in transformers 5's own layout.

The published folders carry transformers 4 weight names in sharded safetensors with an index, a
flat ``config.json``, ``preprocessor_config.json``, ``chat_template.json`` and a ``Qwen2Tokenizer``
configuration; :mod:`~qwen25vl_embed_server.core.fixtures.tiny_hub_layout` rewrites the tiny checkpoint into
that layout. transformers' own loading is the reference; fp32 on the CPU, so equality is exact.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from qwen25vl_embed_server.core.fixtures.tiny_hub_layout import build_tiny_hub_model, hub_weight_name, write_hub_layout
from qwen25vl_embed_server.core.fixtures.tiny_model import CHAT_TEMPLATE, build_tiny_model
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.loading import LoadedModel, LoadOptions, load_model

from ..helpers import noise_image
from .test_fidelity import ALL_OUTPUTS

# Names of the published checkpoints' weights (transformers 4): no language_model / visual prefix.
PUBLISHED_NAME = re.compile(
    r"^(model\.(embed_tokens|layers\.\d+|norm)\.|visual\.(patch_embed|blocks\.\d+|merger)\.|lm_head\.)"
)
SHARD_NAME = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16384  # the tiny processor's pixel range
OUTPUTS = ALL_OUTPUTS


@pytest.fixture(scope="module")
def hub_path(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hub_layout(tiny_model_path, tmp_path_factory.mktemp("hub") / "Qwen2.5-VL-tiny", shards=3)


@pytest.fixture(scope="module")
def hub_loaded(hub_path: Path) -> LoadedModel:
    return load_model(LoadOptions(model=str(hub_path), device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def reference(tiny_model_path: Path) -> Any:
    """The tiny model in transformers 5's layout, loaded by transformers."""
    return AutoModelForImageTextToText.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _assert_same_weights(actual: torch.nn.Module, expected: torch.nn.Module) -> None:
    got, want = actual.state_dict(), expected.state_dict()
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def test_hub_weight_names() -> None:
    assert hub_weight_name("model.language_model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    assert hub_weight_name("model.language_model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert hub_weight_name("model.visual.blocks.0.attn.qkv.bias") == "visual.blocks.0.attn.qkv.bias"
    assert hub_weight_name("model.visual.merger.mlp.0.weight") == "visual.merger.mlp.0.weight"
    assert hub_weight_name("lm_head.weight") == "lm_head.weight"
    assert hub_weight_name("visual.patch_embed.proj.weight") == "visual.patch_embed.proj.weight"
    with pytest.raises(ValueError, match=r"not a Qwen2\.5-VL weight name"):
        hub_weight_name("custom_text_proj.weight")


@pytest.mark.parametrize("shards", [2, 5])
def test_weights_are_sharded_under_published_names(tiny_model_path: Path, tmp_path: Path, shards: int) -> None:
    out = write_hub_layout(tiny_model_path, tmp_path, shards=shards)
    index = _json(out / "model.safetensors.index.json")
    files = sorted(path.name for path in out.glob("*.safetensors"))
    assert files == [f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)]
    assert not (out / "model.safetensors").exists()
    stored: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(out / file, framework="pt") as reader:
            assert reader.metadata() == {"format": "pt"}
            names = list(reader.keys())
            assert names, f"{file} is empty"
            assert all(index["weight_map"][name] == file for name in names)
            stored.update({name: reader.get_tensor(name) for name in names})
    assert sorted(index["weight_map"]) == sorted(stored)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert all(PUBLISHED_NAME.match(name) for name in stored), sorted(stored)
    assert not any("language_model" in name for name in stored)
    with safe_open(tiny_model_path / "model.safetensors", framework="pt") as reader:
        source = {hub_weight_name(name): reader.get_tensor(name) for name in reader.keys()}  # noqa: SIM118
    assert sorted(source) == sorted(stored)
    for name, tensor in source.items():
        assert stored[name].dtype == tensor.dtype, name
        assert torch.equal(stored[name], tensor), name


def test_more_shards_than_tensors_is_refused(tiny_model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shards must be between 1"):
        write_hub_layout(tiny_model_path, tmp_path, shards=100_000)


def test_files_are_the_published_ones(hub_path: Path) -> None:
    names = {path.name for path in hub_path.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "chat_template.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "model.safetensors.index.json",
    } <= names
    # transformers 5's files are absent: loading goes down the paths a hub download takes.
    assert not names & {"processor_config.json", "chat_template.jinja", "model.safetensors"}
    config = _json(hub_path / "config.json")
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert config["model_type"] == "qwen2_5_vl"
    assert "text_config" not in config
    assert config["hidden_size"] == 64
    assert config["num_hidden_layers"] == 2
    assert config["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    assert config["torch_dtype"] == "float32"
    assert config["vision_config"]["depth"] == 4
    assert "model_type" not in config["vision_config"]
    preprocessor = _json(hub_path / "preprocessor_config.json")
    assert preprocessor["image_processor_type"] == "Qwen2VLImageProcessor"
    assert (preprocessor["min_pixels"], preprocessor["max_pixels"]) == (MIN_PIXELS, MAX_PIXELS)
    assert (preprocessor["patch_size"], preprocessor["temporal_patch_size"], preprocessor["merge_size"]) == (14, 2, 2)
    assert _json(hub_path / "chat_template.json") == {"chat_template": CHAT_TEMPLATE}
    assert _json(hub_path / "tokenizer_config.json")["tokenizer_class"] == "Qwen2Tokenizer"
    assert (hub_path / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")


def test_transformers_loads_every_weight(hub_path: Path, reference: Any) -> None:
    loading: Any = AutoModelForImageTextToText.from_pretrained(hub_path, output_loading_info=True)
    model, info = loading
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    _assert_same_weights(model, reference)
    assert model.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    # Settings equal the tiny model's, but for what only the published files carry.
    for sub, published_only in (("text_config", set()), ("vision_config", {"in_chans", "spatial_patch_size"})):
        got, want = getattr(model.config, sub).to_dict(), getattr(reference.config, sub).to_dict()
        if got.get("rope_parameters"):
            got["rope_parameters"].pop("type", None)  # rope_scaling's "type": "mrope"
        assert {k: v for k, v in got.items() if k not in published_only} == want, sub
    assert model.config.image_token_id == reference.config.image_token_id


def test_project_loader_loads_it_as_transformers_does(hub_path: Path, hub_loaded: LoadedModel) -> None:
    expected = AutoModelForImageTextToText.from_pretrained(hub_path, dtype=torch.float32)
    _assert_same_weights(hub_loaded.model, expected)
    processor = AutoProcessor.from_pretrained(hub_path)
    assert type(hub_loaded.processor) is type(processor)
    assert type(hub_loaded.processor.tokenizer).__name__ == "Qwen2Tokenizer"
    for size in (hub_loaded.processor.image_processor.size, processor.image_processor.size):
        assert (size["shortest_edge"], size["longest_edge"]) == (MIN_PIXELS, MAX_PIXELS)
    assert hub_loaded.processor.chat_template == CHAT_TEMPLATE == processor.chat_template


def test_prompt_tokens_equal_the_tiny_models(hub_loaded: LoadedModel, loaded: LoadedModel) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in it? Ünïcode"}]}]
    texts = [
        m.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        for m in (hub_loaded, loaded)
    ]
    assert texts[0] == texts[1]
    assert hub_loaded.processor.tokenizer(texts[0]).input_ids == loaded.processor.tokenizer(texts[1]).input_ids


def test_capture_points_equal_the_tiny_models(hub_loaded: LoadedModel, extractor: Extractor) -> None:
    hub = Extractor(hub_loaded)
    image = noise_image(224, 224)
    got = hub.extract([image], plan=hub.plan(OUTPUTS)).tensors
    want = extractor.extract([image], plan=extractor.plan(OUTPUTS)).tensors
    assert sorted(got) == sorted(want)
    for name in OUTPUTS:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_bfloat16_as_published(tmp_path: Path) -> None:
    """Published weights are bf16 and say so (``torch_dtype``); transformers loads them in bf16."""
    hub = build_tiny_hub_model(tmp_path / "hub", dtype=torch.bfloat16)
    assert _json(hub / "config.json")["torch_dtype"] == "bfloat16"
    for file in sorted(hub.glob("model-*.safetensors")):
        with safe_open(file, framework="pt") as reader:
            assert {reader.get_slice(name).get_dtype() for name in reader.keys()} == {"BF16"}  # noqa: SIM118
    tiny = build_tiny_model(tmp_path / "t5", dtype=torch.bfloat16)
    model = AutoModelForImageTextToText.from_pretrained(hub)
    assert model.dtype == torch.bfloat16
    _assert_same_weights(model, AutoModelForImageTextToText.from_pretrained(tiny))
    # The project's bf16 CPU loading repacks the weights: compared by what it computes.
    ours, theirs = (
        Extractor(load_model(LoadOptions(model=str(path), device="cpu", dtype="bfloat16"))) for path in (hub, tiny)
    )
    image, names = noise_image(224, 224), ["projected_tokens", "lm_last_hidden"]
    got, want = ours.extract([image], plan=ours.plan(names)), theirs.extract([image], plan=theirs.plan(names))
    for name in names:
        np.testing.assert_array_equal(got.tensors[name], want.tensors[name], err_msg=name)
