"""A partly random model is never served: weights that do not all fit the model refuse the load in
one line, unless partial weights are allowed; and the recipe comes from everything the folder says."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration

from qwen25vl_embed_server.core.errors import ModelLoadError
from qwen25vl_embed_server.core.fixtures.tiny_model import TinyShape, build_config, build_processor
from qwen25vl_embed_server.core.fixtures.tiny_retrieval import build_tiny_retrieval
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.loading import LoadedModel, LoadOptions, load_model
from qwen25vl_embed_server.core.retrieval.layout import detect_recipe, find_layout

REFUSAL = "refusing to serve a partly random model (--allow-partial-weights loads it anyway)"


def _load(path: Path, **options: object) -> LoadedModel:
    return load_model(LoadOptions(model=str(path), device="cpu", dtype="float32", **options))  # type: ignore[arg-type]


def _edit_weights(file: Path, edit: dict[str, str | None]) -> None:
    """Rename (or, to None, drop) tensors of a safetensors file in place."""
    tensors = load_file(str(file))
    for key, new in edit.items():
        tensor = tensors.pop(key)
        if new is not None:
            tensors[new] = tensor
    save_file(tensors, str(file), metadata={"format": "pt"})


def _copy_adapter(adapter: Path, to: Path, base: Path | None = None) -> Path:
    """A copy of an adapter folder; on ``base`` when given (else on the original's base)."""
    shutil.copytree(adapter, to)
    if base is not None:
        config = json.loads((to / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(base)
        (to / "adapter_config.json").write_text(json.dumps(config))
    return to


@pytest.fixture(scope="module")
def missing_norm(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint without the language model's final norm (stored under its older name)."""
    path = tmp_path_factory.mktemp("partial") / "tiny"
    shutil.copytree(tiny_model_path, path)
    _edit_weights(path / "model.safetensors", {"model.norm.weight": None})
    return path


def test_a_checkpoint_missing_a_weight_is_refused_in_one_line(missing_norm: Path) -> None:
    with pytest.raises(ModelLoadError) as refused:
        _load(missing_norm)
    assert str(refused.value) == (
        f"cannot load model '{missing_norm}': checkpoint {missing_norm}: "
        f"1 missing (newly initialised): model.language_model.norm.weight; {REFUSAL}"
    )


def test_allowed_partial_weights_load_with_a_warning(missing_norm: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="qwen25vl_embed_server.core.model.load_report"):
        loaded = _load(missing_norm, allow_partial_weights=True)
    assert [record.getMessage() for record in caplog.records] == [
        f"checkpoint {missing_norm}: 1 missing (newly initialised): model.language_model.norm.weight; "
        "loaded anyway (partial weights allowed)"
    ]
    assert loaded.report is not None
    assert not loaded.report.complete
    assert loaded.report.weights[0].missing == ("model.language_model.norm.weight",)


def test_an_unexpected_weight_is_refused_and_many_missing_are_counted(tiny_model_path: Path, tmp_path: Path) -> None:
    """A base checkpoint holding a weight that fits no module is refused too; of more missing
    weights than a line names, it names the first three (sorted, as the model names them) and the count."""
    path = tmp_path / "tiny"
    shutil.copytree(tiny_model_path, path)
    norms = [
        f"model.layers.{i}.{norm}.weight" for i in (0, 1) for norm in ("input_layernorm", "post_attention_layernorm")
    ]
    # The first norm stored under a name no module has; the other three dropped.
    _edit_weights(path / "model.safetensors", {norms[0]: "model.layers.0.extra_norm.weight"} | dict.fromkeys(norms[1:]))
    with pytest.raises(ModelLoadError) as refused:
        _load(path)
    named = [name.replace("model.", "model.language_model.", 1) for name in sorted(norms)[:3]]
    assert str(refused.value) == (
        f"cannot load model '{path}': checkpoint {path}: 4 missing (newly initialised): {', '.join(named)}, ...; "
        f"1 unexpected (match no module): model.language_model.layers.0.extra_norm.weight; {REFUSAL}"
    )


def test_an_adapter_key_that_matches_no_module_is_refused(colqwen_adapter: Path, tmp_path: Path) -> None:
    adapter = _copy_adapter(colqwen_adapter, tmp_path / "adapter")
    key = "base_model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    _edit_weights(adapter / "adapter_model.safetensors", {key: key.replace("q_proj", "x_proj")})
    with pytest.raises(ModelLoadError) as refused:
        _load(adapter)
    lora = "base_model.model.language_model.layers.0.self_attn.{}.lora_A.default.weight"
    assert str(refused.value) == (
        f"cannot load model '{adapter}': adapter {adapter}: 1 missing (newly initialised): {lora.format('q_proj')}; "
        f"1 unexpected (match no module): {lora.format('x_proj')}; {REFUSAL}"
    )
    assert _load(adapter, allow_partial_weights=True).report is not None


def test_a_retrieval_base_without_its_head_is_refused(colqwen_adapter: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(colqwen_adapter.parent / "base", base)
    _edit_weights(base / "model.safetensors", {"custom_text_proj.weight": None, "custom_text_proj.bias": None})
    adapter = _copy_adapter(colqwen_adapter, tmp_path / "adapter", base=base)
    with pytest.raises(ModelLoadError) as refused:
        _load(adapter)
    assert str(refused.value) == (
        f"cannot load model '{adapter}': checkpoint {base}: "
        f"2 missing (newly initialised): custom_text_proj.bias, custom_text_proj.weight; {REFUSAL}"
    )


def test_every_fixture_model_loads_strictly(
    loaded: LoadedModel, colqwen: Extractor, colqwen_adapter: Path, tmp_path: Path
) -> None:
    bi = build_tiny_retrieval(tmp_path / "bi", "biqwen2.5")
    reports = [
        loaded.report,
        colqwen.loaded.report,
        _load(bi).report,
        _load(colqwen_adapter.parent / "base").report,
        _load(bi.parent / "base").report,
    ]
    for report in reports:
        assert report is not None
        assert report.complete, report
    counts = [[(check.kind, check.matched) for check in report.weights] for report in reports if report]
    assert counts == [
        [("checkpoint", 81)],
        [("checkpoint", 82), ("adapter", 30)],
        [("checkpoint", 80), ("adapter", 28)],
        [("checkpoint", 82)],
        [("checkpoint", 80)],
    ]


def test_raw_states_of_a_colqwen_adapter_load_strictly(colqwen_adapter: Path) -> None:
    """``--recipe none``: the body that fits the checkpoint (its head and the head's LoRA load, unused)."""
    raw = _load(colqwen_adapter, recipe="none")
    assert (raw.recipe, raw.head) == (None, None)
    assert raw.report is not None
    assert raw.report.complete
    assert raw.report.recipe_reason == "recipe 'none' asked for"


def test_tied_word_embeddings_are_not_missing(tmp_path: Path) -> None:
    """A checkpoint that ties lm_head to the embeddings stores one of them: nothing is missing."""
    processor = build_processor()
    config = build_config(processor.tokenizer, TinyShape())
    config.tie_word_embeddings = True
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as stored:
        stored_keys = list(stored.keys())
    assert "lm_head.weight" not in stored_keys
    report = _load(tmp_path).report
    assert report is not None
    assert report.complete


def _folder(path: Path, files: dict[str, dict[str, object]]) -> Path:
    path.mkdir(parents=True)
    for name, content in files.items():
        (path / name).write_text(json.dumps(content))
    return path


def test_the_adapters_config_names_the_recipe(tmp_path: Path) -> None:
    adapter_config: dict[str, object] = {
        "base_model_name_or_path": str(tmp_path / "base"),
        "auto_mapping": {"base_model_class": "BiQwen2_5"},
    }
    _folder(tmp_path / "base", {"config.json": {"architectures": ["ColQwen2_5"]}})
    layout = find_layout(str(_folder(tmp_path / "adapter", {"adapter_config.json": adapter_config})))
    assert layout is not None
    assert detect_recipe(layout) == ("biqwen2.5", "the adapter's config names BiQwen2_5")


def test_a_folder_that_names_two_recipes_is_refused_unless_one_is_chosen(colqwen_adapter: Path, tmp_path: Path) -> None:
    """The adapter trains ColQwen2.5's head, its processor files name BiQwen2.5's processor."""
    adapter = _copy_adapter(colqwen_adapter, tmp_path / "adapter")
    settings = json.loads((adapter / "processor_config.json").read_text())
    (adapter / "processor_config.json").write_text(json.dumps({**settings, "processor_class": "BiQwen2_5_Processor"}))
    with pytest.raises(ModelLoadError) as refused:
        _load(adapter)
    assert str(refused.value) == (
        f"cannot load model '{adapter}': the checkpoint names more than one recipe: "
        "its processor files name BiQwen2_5_Processor (biqwen2.5); "
        "the adapter's weights train custom_text_proj (colqwen2.5); choose one with --recipe"
    )
    chosen = _load(adapter, recipe="colqwen2.5")
    assert chosen.recipe is not None
    assert chosen.report is not None
    assert (chosen.recipe.name, chosen.report.recipe_reason) == ("colqwen2.5", "recipe 'colqwen2.5' asked for")


def test_a_plain_checkpoint_whose_processor_is_colpalis_is_refused(tiny_model_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "tiny"
    shutil.copytree(tiny_model_path, path)
    settings = json.loads((path / "processor_config.json").read_text())
    (path / "processor_config.json").write_text(json.dumps({**settings, "processor_class": "ColQwen2_5_Processor"}))
    with pytest.raises(ModelLoadError, match=r": its processor files give a \w+, not a Qwen2\.5-VL processor$"):
        _load(path)
