"""ColQwen2.5 and BiQwen2.5 served as colpali-engine computes them.

Random-weight checkpoints in the published layout (base + LoRA adapter + head) are built offline;
the reference is colpali-engine 0.3.18 loading the same adapter folder its own way (transformers'
PEFT integration, LoRA unmerged, left padding). We merge the adapter at load and pad right, so
the comparison is within 1e-5 relative (fp32), single and batched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from colpali_engine.models import BiQwen2_5, BiQwen2_5_Processor, ColQwen2_5, ColQwen2_5_Processor
from PIL import Image

from qwen25vl_embed_server.core.errors import InvalidInputError
from qwen25vl_embed_server.core.fixtures.tiny_retrieval import build_tiny_retrieval
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.finishing import Extraction
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model
from qwen25vl_embed_server.core.model.output_settings import OutputSettings

from ..helpers import assert_batched_close, noise_image

IMAGES = [noise_image(224, 224, seed=1), noise_image(300, 140, seed=2), noise_image(112, 168, seed=3)]
QUERIES = ["where is the cat", "a chart of quarterly revenue by region", "x"]


@pytest.fixture(scope="module")
def col_adapter(colqwen_adapter: Path) -> Path:
    return colqwen_adapter


@pytest.fixture(scope="module")
def bi_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_retrieval(tmp_path_factory.mktemp("biqwen"), "biqwen2.5")


def _extractor(path: Path, **options: Any) -> Extractor:
    return Extractor(load_model(LoadOptions(model=str(path), device="cpu", dtype="float32", **options)))


@pytest.fixture(scope="module")
def col(colqwen: Extractor) -> Extractor:
    return colqwen


@pytest.fixture(scope="module")
def col_reference(col_adapter: Path) -> tuple[Any, Any]:
    return ColQwen2_5.from_pretrained(
        str(col_adapter), dtype=torch.float32
    ).eval(), ColQwen2_5_Processor.from_pretrained(str(col_adapter))


def _documents(extractor: Extractor, images: list[Image.Image], **kwargs: Any) -> list[Extraction]:
    plan = extractor.plan([])
    return extractor.run([extractor.prepare([im], "", plan, prompt_format="document", **kwargs) for im in images])


def _queries(extractor: Extractor, texts: list[str], **kwargs: Any) -> list[Extraction]:
    plan = extractor.plan([], has_images=False)
    return extractor.run([extractor.prepare([], text, plan, prompt_format="query", **kwargs) for text in texts])


def _left_padded_rows(reference: torch.Tensor, ours: np.ndarray) -> np.ndarray:
    """The reference's rows of one request: the last T of its left-padded sequence."""
    return reference[-ours.shape[0] :].numpy()


def test_info_reports_the_detected_recipe(col: Extractor) -> None:
    recipe = col.info().recipe
    assert recipe is not None
    assert (recipe.name, recipe.output, recipe.dimension, recipe.pooling) == (
        "colqwen2.5",
        "multi_vector",
        128,
        "tokens",
    )
    assert recipe.document_template == ColQwen2_5_Processor.visual_prompt_prefix.replace(
        "<|vision_start|><|image_pad|><|vision_end|>", "<image>"
    )
    assert col.info().default_outputs == ("multi_vector",)


@pytest.mark.parametrize("batched", [False, True], ids=["alone", "batched"])
def test_colqwen_documents_equal_colpali(col: Extractor, col_reference: tuple[Any, Any], batched: bool) -> None:
    model, processor = col_reference
    ours = _documents(col, IMAGES) if batched else [_documents(col, [im])[0] for im in IMAGES]
    with torch.inference_mode():
        reference = model(**processor.process_images(IMAGES)) if batched else None
        for index, image in enumerate(IMAGES):
            expected = reference[index] if reference is not None else model(**processor.process_images([image]))[0]
            vectors = ours[index].tensors["multi_vector"]
            assert vectors.shape == (ours[index].sequence_length, 128)
            assert_batched_close(vectors, _left_padded_rows(expected, vectors), f"document {index}")


@pytest.mark.parametrize("batched", [False, True], ids=["alone", "batched"])
def test_colqwen_queries_equal_colpali(col: Extractor, col_reference: tuple[Any, Any], batched: bool) -> None:
    model, processor = col_reference
    ours = _queries(col, QUERIES) if batched else [_queries(col, [q])[0] for q in QUERIES]
    with torch.inference_mode():
        reference = model(**processor.process_queries(QUERIES)) if batched else None
        for index, query in enumerate(QUERIES):
            expected = reference[index] if reference is not None else model(**processor.process_queries([query]))[0]
            vectors = ours[index].tensors["multi_vector"]
            assert_batched_close(vectors, _left_padded_rows(expected, vectors), f"query {index}")


def test_the_adapter_is_merged(col: Extractor, col_adapter: Path) -> None:
    """The base folder alone (merged-weights layout, no LoRA) gives other vectors: the LoRA counts."""
    base_only = _extractor(col_adapter.parent / "base")
    assert base_only.info().recipe is not None
    ours, bare = _queries(col, QUERIES[:1])[0], _queries(base_only, QUERIES[:1])[0]
    assert np.abs(ours.tensors["multi_vector"] - bare.tensors["multi_vector"]).max() > 1e-3


def test_matryoshka_dimensions_truncate_and_renormalise(col: Extractor) -> None:
    full = _queries(col, QUERIES[:1])[0].tensors["multi_vector"]
    short = _queries(col, QUERIES[:1], settings=OutputSettings(dimensions=32))[0].tensors["multi_vector"]
    expected = full[:, :32] / np.linalg.norm(full[:, :32], axis=-1, keepdims=True)
    np.testing.assert_allclose(short, expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(InvalidInputError, match=r"dimensions=129 is out of range \(at most 128\)"):
        _queries(col, QUERIES[:1], settings=OutputSettings(dimensions=129))


def test_image_tokens_only_matches_the_reference_mask(col_adapter: Path) -> None:
    ours = _documents(_extractor(col_adapter, image_tokens_only=True), IMAGES[:1])[0].tensors["multi_vector"]
    model = ColQwen2_5.from_pretrained(str(col_adapter), dtype=torch.float32, mask_non_image_embeddings=True).eval()
    processor = ColQwen2_5_Processor.from_pretrained(str(col_adapter))
    with torch.inference_mode():
        expected = model(**processor.process_images(IMAGES[:1]))[0]
    assert_batched_close(ours, _left_padded_rows(expected, ours))
    assert int((np.abs(ours).sum(-1) > 0).sum()) == 64  # a 224x224 image: 16x16 patches -> 64 tokens


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_biqwen_documents_and_queries_equal_colpali(bi_adapter: Path, pooling: str) -> None:
    ours = _extractor(bi_adapter, pooling=pooling)
    assert ours.info().recipe is not None
    # colpali-engine 0.3.18's BiQwen2_5.from_pretrained reads a class attribute transformers 5.x
    # no longer has when no key_mapping is given; an empty one is what it would default to.
    model = BiQwen2_5.from_pretrained(str(bi_adapter), dtype=torch.float32, key_mapping={}).eval()
    processor = BiQwen2_5_Processor.from_pretrained(str(bi_adapter))
    docs, queries = _documents(ours, IMAGES), _queries(ours, QUERIES)
    with torch.inference_mode():
        doc_ref = model(pooling_strategy=pooling, **processor.process_images(IMAGES))
        query_ref = model(pooling_strategy=pooling, **processor.process_queries(QUERIES))
        alone = model(pooling_strategy=pooling, **processor.process_queries(QUERIES[:1]))
    for index in range(len(IMAGES)):
        assert_batched_close(docs[index].tensors["single_vector"][0], doc_ref[index].numpy(), f"document {index}")
        assert_batched_close(queries[index].tensors["single_vector"][0], query_ref[index].numpy(), f"query {index}")
    single = _queries(ours, QUERIES[:1])[0].tensors["single_vector"]
    assert single.shape == (1, 64)
    assert_batched_close(single[0], alone[0].numpy())
