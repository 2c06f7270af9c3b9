"""Every published and trained layout of ColQwen2.5 / BiQwen2.5 is served as colpali-engine computes it.

Each layout (``retrieval_layouts.py``) is built with colpali-engine's classes and peft, loaded
strictly with the recipe detected, and compared in fp32 with colpali-engine 0.3.18 loading the
same folder its own way (LoRA unmerged, left padding): documents alone and batched, queries
alone and batched, and the scores, within 1e-5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from colpali_engine.models import BiQwen2_5, BiQwen2_5_Processor, ColQwen2_5, ColQwen2_5_Processor

from qwen25vl_embed import maxsim
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.finishing import Extraction
from qwen25vl_embed_server.core.model.loading import LoadedModel, LoadOptions, load_model
from qwen25vl_embed_server.core.retrieval.model import COLPALI_KEY_MAPPING

from ..helpers import assert_batched_close, noise_image
from .retrieval_layouts import LAYOUTS, TRAINER_MAX_PIXELS, Built, build_layout

IMAGES = [noise_image(224, 224, seed=1), noise_image(300, 140, seed=2), noise_image(112, 168, seed=3)]
QUERIES = ["where is the cat", "a chart of quarterly revenue by region", "x"]
CASES = [(kind, layout) for kind, layouts in LAYOUTS.items() for layout in layouts]


@dataclass(frozen=True)
class Case:
    kind: str
    layout: str
    built: Built
    loaded: LoadedModel
    ours: Extractor
    reference: Any
    processor: Any

    @property
    def output(self) -> str:
        return "multi_vector" if self.kind == "colqwen2.5" else "single_vector"

    def run(self, **inputs: Any) -> torch.Tensor:
        with torch.inference_mode():
            result: torch.Tensor = self.reference(**inputs)
        return result


@pytest.fixture(scope="module", params=CASES, ids=[f"{kind}-{layout}" for kind, layout in CASES])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    kind, layout = request.param
    built = build_layout(tmp_path_factory.mktemp(f"{kind}-{layout}"), kind, layout)
    loaded = load_model(LoadOptions(model=str(built.serve), device="cpu", dtype="float32"))
    if kind == "colqwen2.5":
        reference = ColQwen2_5.from_pretrained(str(built.serve), dtype=torch.float32).eval()
        processor = ColQwen2_5_Processor.from_pretrained(str(built.processor))
    else:
        # BiQwen2_5.from_pretrained's own default mapping reads a class attribute transformers 5
        # no longer has; ColQwen2_5's mapping holds the same renames of the language model.
        reference = BiQwen2_5.from_pretrained(
            str(built.serve), dtype=torch.float32, key_mapping=ColQwen2_5._checkpoint_conversion_mapping
        ).eval()
        processor = BiQwen2_5_Processor.from_pretrained(str(built.processor))
    return Case(kind, layout, built, loaded, Extractor(loaded), reference, processor)


def _documents(extractor: Extractor, images: list[Any]) -> list[Extraction]:
    plan = extractor.plan([])
    return extractor.run([extractor.prepare([im], "", plan, prompt_format="document") for im in images])


def _queries(extractor: Extractor, texts: list[str]) -> list[Extraction]:
    plan = extractor.plan([], has_images=False)
    return extractor.run([extractor.prepare([], text, plan, prompt_format="query") for text in texts])


def _assert_equal(case: Case, ours: Extraction, expected: torch.Tensor, rows: int, name: str) -> None:
    """``expected``: the reference's vectors of one input (left-padded: its last ``rows`` rows are
    the input's own)."""
    vectors = ours.tensors[case.output]
    if case.output == "multi_vector":
        assert vectors.shape == (rows, 128), name
        assert_batched_close(vectors, expected[-rows:].numpy(), name)
    else:
        assert_batched_close(vectors[0], expected.numpy(), name)


def test_the_recipe_is_detected_and_every_weight_fits(case: Case) -> None:
    report = case.loaded.report
    assert report is not None
    assert (report.recipe, case.loaded.recipe and case.loaded.recipe.name) == (case.kind, case.kind)
    assert report.complete, report
    adapter = [check for check in report.weights if check.kind == "adapter"]
    lora = 30 if case.kind == "colqwen2.5" else 28  # 2 layers x 7 projections x (A, B) (+ the head's A, B)
    assert [check.matched for check in adapter] == ([] if case.layout == "merged" else [lora])
    if case.layout == "bi-from-col":
        assert "ColQwen2_5" in (case.built.serve.parent / "base" / "config.json").read_text()
        assert report.recipe_reason == "its processor files name BiQwen2_5_Processor"


@pytest.mark.parametrize("batched", [False, True], ids=["alone", "batched"])
def test_documents_equal_colpali(case: Case, batched: bool) -> None:
    ours = _documents(case.ours, IMAGES) if batched else [_documents(case.ours, [im])[0] for im in IMAGES]
    inputs = case.processor.process_images(IMAGES)
    together = case.run(**inputs) if batched else None
    for index, image in enumerate(IMAGES):
        if together is not None:
            expected, rows = together[index], int(inputs["attention_mask"][index].sum())
        else:
            alone = case.processor.process_images([image])
            expected, rows = case.run(**alone)[0], alone["input_ids"].shape[1]
        assert ours[index].sequence_length == rows
        _assert_equal(case, ours[index], expected, rows, f"document {index}")


@pytest.mark.parametrize("batched", [False, True], ids=["alone", "batched"])
def test_queries_equal_colpali(case: Case, batched: bool) -> None:
    ours = _queries(case.ours, QUERIES) if batched else [_queries(case.ours, [q])[0] for q in QUERIES]
    inputs = case.processor.process_queries(QUERIES)
    together = case.run(**inputs) if batched else None
    for index, query in enumerate(QUERIES):
        if together is not None:
            expected, rows = together[index], int(inputs["attention_mask"][index].sum())
        else:
            alone = case.processor.process_queries([query])
            expected, rows = case.run(**alone)[0], alone["input_ids"].shape[1]
        _assert_equal(case, ours[index], expected, rows, f"query {index}")


def test_scores_equal_colpali(case: Case) -> None:
    """MaxSim (ColQwen2.5) or the dot product (BiQwen2.5) of every query with every document."""
    docs = [d.tensors[case.output] for d in _documents(case.ours, IMAGES)]
    queries = [q.tensors[case.output] for q in _queries(case.ours, QUERIES)]
    doc_ref = case.run(**case.processor.process_images(IMAGES))
    query_ref = case.run(**case.processor.process_queries(QUERIES))
    if case.output == "multi_vector":
        ours = np.stack([maxsim(q, docs) for q in queries])
        doc_rows = case.processor.process_images(IMAGES)["attention_mask"].sum(-1)
        query_rows = case.processor.process_queries(QUERIES)["attention_mask"].sum(-1)
        expected = case.processor.score_multi_vector(
            [q[-int(n) :] for q, n in zip(query_ref, query_rows, strict=True)],
            [d[-int(n) :] for d, n in zip(doc_ref, doc_rows, strict=True)],
            device="cpu",
        )
    else:
        ours = np.concatenate(queries) @ np.concatenate(docs).T
        expected = case.processor.score_single_vector(query_ref, doc_ref, device="cpu")
    assert_batched_close(ours, expected.float().numpy())


def test_the_adapter_counts(case: Case) -> None:
    """The reference on the base alone gives other vectors: a missing adapter would show above."""
    if case.layout == "merged":
        pytest.skip("merged weights: no adapter to miss")
    ours = _queries(case.ours, QUERIES[:1])[0].tensors[case.output]
    base = str(case.built.serve.parent / "base")
    bare_model = type(case.reference).from_pretrained(base, dtype=torch.float32, key_mapping=COLPALI_KEY_MAPPING)
    with torch.inference_mode():
        bare = bare_model.eval()(**case.processor.process_queries(QUERIES[:1]))[0].numpy()
    if case.output == "multi_vector":
        bare = bare[-ours.shape[0] :]
    assert np.abs(ours - bare).max() > 1e-2


def test_the_trainer_folder_keeps_its_pixel_range(case: Case) -> None:
    if case.layout not in ("trainer", "bi-from-col"):
        pytest.skip("the adapter folder's own pixel range: trainer layouts")
    assert case.ours.info().max_pixels == TRAINER_MAX_PIXELS
    inputs = case.processor.process_images(IMAGES[:1])
    # 224 x 224 = 50176 pixels, resized below 25088: fewer than the 64 image tokens of the base's range.
    assert int((inputs["input_ids"] == case.loaded.model.config.image_token_id).sum()) < 64
    assert _documents(case.ours, IMAGES[:1])[0].sequence_length == inputs["input_ids"].shape[1]


def test_the_key_mapping_is_colpalis() -> None:
    assert ColQwen2_5._checkpoint_conversion_mapping == COLPALI_KEY_MAPPING


def test_the_older_names_are_what_the_files_hold(tmp_path: Path) -> None:
    """The fixture stores what vidore's checkpoints store: no key under the names transformers 5 writes."""
    from safetensors import safe_open

    built = build_layout(tmp_path, "colqwen2.5", "older-names")
    with safe_open(str(built.serve.parent / "base" / "model.safetensors"), framework="numpy") as base:
        keys = list(base.keys())
    with safe_open(str(built.serve / "adapter_model.safetensors"), framework="numpy") as adapter:
        adapter_keys = list(adapter.keys())
    assert "model.embed_tokens.weight" in keys
    assert not any(k.startswith("language_model.") for k in keys)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in adapter_keys
    assert "base_model.model.custom_text_proj.lora_B.weight" in adapter_keys
