"""Several retrieval adapters on one base: each adapter's outputs equal a model loaded with that
adapter alone, in batches of one adapter or of several, and the base's own outputs are unchanged.

What holds, and why a tolerance: the model loaded with one adapter merges its LoRA into the base
weights (``W + B @ A * scale``, as peft merges); the shared base keeps each adapter's LoRA beside
the base weights (``x W^T + (x A^T) B^T * scale``, as peft's unmerged layer). The two sum in
another order, so they agree within float rounding: 1e-5 relative in fp32 (measured here: a few
1e-7). A ColQwen2.5 head is merged in both (the same operation on the same weights). A request
without an adapter runs the base layers alone: bit-identical to the base served as raw states.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from qwen25vl_embed_server.core.errors import InvalidInputError, ModelLoadError
from qwen25vl_embed_server.core.fixtures.tiny_adapters import TinyAdapters, build_tiny_adapters
from qwen25vl_embed_server.core.fixtures.tiny_retrieval import build_tiny_retrieval
from qwen25vl_embed_server.core.model.extractor import Extractor, Prepared
from qwen25vl_embed_server.core.model.finishing import Extraction
from qwen25vl_embed_server.core.model.output_settings import OutputSettings
from qwen25vl_embed_server.core.retrieval.adapter_spec import AdapterSpec

from ..helpers import assert_batched_close, load_extractor, noise_image

IMAGES = (noise_image(140, 112, seed=1), noise_image(224, 168, seed=2))
QUERIES = ("a red bicycle", "tables of quarterly revenue")
RAW = ["lm_last_token", "lm_pooled_mean", "lm_layer_1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyAdapters:
    return build_tiny_adapters(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def shared(tiny: TinyAdapters) -> Extractor:
    """The base with both adapters."""
    return load_extractor(tiny.base, *tiny.flags())


@pytest.fixture(scope="module")
def alone(tiny: TinyAdapters) -> dict[str, Extractor]:
    """Each adapter loaded alone (its LoRA merged), and the base as raw states ("")."""
    models = {name: load_extractor(path) for name, path in tiny.adapters.items()}
    return models | {"": load_extractor(tiny.base, recipe="none")}


def _requests(extractor: Extractor, adapter: str | None, dimensions: int = 0) -> list[Prepared]:
    """Two documents and two queries in the recipe's formats; without a recipe (the raw base), the
    same images and texts in the chat format, asking for LM states."""
    settings = OutputSettings(dimensions=dimensions)
    if adapter is None and extractor.recipe is None:
        images = [extractor.prepare([image], "Describe.", extractor.plan(RAW)) for image in IMAGES]
        texts = [extractor.prepare([], text, extractor.plan(RAW, has_images=False)) for text in QUERIES]
        return images + texts
    documents = [
        extractor.prepare([image], "", settings=settings, prompt_format="document", adapter=adapter) for image in IMAGES
    ]
    queries = [
        extractor.prepare([], text, settings=settings, prompt_format="query", adapter=adapter) for text in QUERIES
    ]
    return documents + queries


def _assert_same(actual: Extraction, expected: Extraction, what: str) -> None:
    assert actual.tensors.keys() == expected.tensors.keys(), what
    for name, array in expected.tensors.items():
        assert actual.tensors[name].shape == array.shape, f"{what}: {name}"
        assert_batched_close(actual.tensors[name], array, f"{what}: {name}")


@pytest.mark.parametrize("adapter", ["colqwen", "biqwen"])
def test_each_adapter_equals_the_adapter_loaded_alone(
    shared: Extractor, alone: dict[str, Extractor], adapter: str
) -> None:
    for dimensions in (0, 16):
        expected = [alone[adapter].run([item])[0] for item in _requests(alone[adapter], None, dimensions)]
        actual = [shared.run([item])[0] for item in _requests(shared, adapter, dimensions)]
        for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
            _assert_same(got, want, f"{adapter} request {index} dimensions={dimensions}")
    assert ("multi_vector" if adapter == "colqwen" else "single_vector") in expected[0].tensors


def test_each_adapter_changes_the_language_model(shared: Extractor) -> None:
    """The comparisons here are between adapted models: each adapter's LoRA changes the states."""
    states = {
        adapter: shared.extract([IMAGES[0]], "x", shared.plan(["lm_last_token"]), adapter=adapter).tensors[
            "lm_last_token"
        ]
        for adapter in ("colqwen", "biqwen", None)
    }
    for a, b in (("colqwen", "biqwen"), ("colqwen", None), ("biqwen", None)):
        assert np.abs(states[a] - states[b]).max() > 1e-3, (a, b)


@pytest.mark.parametrize("batching", ["mixed", "grouped"])
def test_mixed_adapter_batch_equals_each_alone(shared: Extractor, alone: dict[str, Extractor], batching: str) -> None:
    """One batch of colqwen, biqwen and base requests interleaved: each result equals its own
    model's, whether the batch runs as one forward (a LoRA per row) or one per adapter."""
    names = ["colqwen", "biqwen", ""]
    per_adapter = {name: _requests(shared, name or None) for name in names}
    batch = [item for row in zip(*per_adapter.values(), strict=True) for item in row]
    shared.adapter_batching = batching
    try:
        results = shared.run(batch)
    finally:
        shared.adapter_batching = "mixed"
    for index, (item, result) in enumerate(zip(batch, results, strict=True)):
        reference = alone[item.adapter or ""]
        request = _requests(reference, None)[index // len(names)]
        _assert_same(result, reference.run([request])[0], f"{batching} batch row {index} ({item.adapter or 'base'})")


def test_base_requests_are_the_base_served_alone(shared: Extractor, alone: dict[str, Extractor]) -> None:
    """No adapter: the base's raw outputs, bit-identical for a request run alone."""
    outputs = ["lm_pooled_mean", "lm_last_token", "projected_pooled_mean", "lm_layer_1"]
    for image in IMAGES:
        ours = shared.extract([image], "Describe.", shared.plan(outputs))
        theirs = alone[""].extract([image], "Describe.", alone[""].plan(outputs))
        for name in outputs:
            np.testing.assert_array_equal(ours.tensors[name], theirs.tensors[name], err_msg=name)


def test_pieces_with_an_adapter_equal_the_whole_run(shared: Extractor) -> None:
    item = shared.prepare(
        list(IMAGES),
        "<image><image>Two pages.",
        prompt_format="raw",
        adapter="colqwen",
        plan=shared.plan(["multi_vector"], adapter="colqwen"),
    )
    assert shared.pieces(item, 100) > 1
    run = shared.run_in_pieces(item, max_piece_tokens=100)
    result = None
    while result is None:
        result = run.step()
    assert_batched_close(result.tensors["multi_vector"], shared.run([item])[0].tensors["multi_vector"])


def test_info_lists_the_adapters(shared: Extractor) -> None:
    info = shared.info()
    assert info.recipe is None
    assert [(a.name, a.recipe.name, a.recipe.output, a.recipe.dimension) for a in info.adapters] == [
        ("colqwen", "colqwen2.5", "multi_vector", 128),
        ("biqwen", "biqwen2.5", "single_vector", 64),
    ]
    assert {"multi_vector", "single_vector"} <= set(info.outputs)
    assert not {"multi_vector", "single_vector"} & set(info.default_outputs)  # the base's raw defaults


def test_an_unknown_adapter_is_refused_naming_the_known_ones(shared: Extractor) -> None:
    with pytest.raises(InvalidInputError, match=r"unknown adapter 'colpali'.*colqwen, biqwen"):
        shared.prepare([], "q", prompt_format="query", adapter="colpali")
    with pytest.raises(InvalidInputError, match=r"unknown adapter 'x'"):
        shared.plan(["multi_vector"], adapter="x")


def test_a_recipe_output_of_the_raw_base_is_refused(shared: Extractor) -> None:
    with pytest.raises(InvalidInputError, match=r"'multi_vector' needs an adapter.*colqwen, biqwen"):
        shared.plan(["multi_vector"])
    with pytest.raises(InvalidInputError, match=r"query format needs a retrieval recipe"):
        shared.prepare([], "q", prompt_format="query")
    with pytest.raises(InvalidInputError, match=r"'single_vector' is not available: this model serves multi_vector"):
        shared.plan(["single_vector"], adapter="colqwen")


def test_an_adapter_of_another_base_is_refused_naming_both(tiny: TinyAdapters, tmp_path: Path) -> None:
    other = build_tiny_retrieval(tmp_path / "other", "biqwen2.5", seed=7)  # same sizes, other weights
    with pytest.raises(ModelLoadError) as refused:
        load_extractor(tiny.base, f"foreign={other}")
    message = str(refused.value)
    assert "--adapter foreign=" in message
    assert str(tmp_path / "other" / "base") in message
    assert str(tiny.base) in message
    assert "weights differ" in message


def test_a_copy_of_the_base_elsewhere_is_the_same_base(
    tiny: TinyAdapters, tmp_path: Path, alone: dict[str, Extractor]
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny.base, copy)
    served = load_extractor(copy, f"biqwen={tiny.adapters['biqwen']}")
    request = _requests(served, "biqwen")[0]
    _assert_same(served.run([request])[0], alone["biqwen"].run([_requests(alone["biqwen"], None)[0]])[0], "copy")


def test_adapter_flags_that_cannot_serve_are_refused(tiny: TinyAdapters) -> None:
    with pytest.raises(ModelLoadError, match=r"is an adapter folder; with --adapter, --model is the base"):
        load_extractor(tiny.adapters["colqwen"], f"biqwen={tiny.adapters['biqwen']}")
    with pytest.raises(ModelLoadError, match=r"--recipe colqwen2.5 serves a model alone"):
        load_extractor(tiny.base, f"biqwen={tiny.adapters['biqwen']}", recipe="colqwen2.5")
    with pytest.raises(ModelLoadError, match=r"--adapter merged=.*not an adapter folder"):
        load_extractor(tiny.base, f"merged={tiny.base}")
    with pytest.raises(ModelLoadError, match=r"'twice' is given twice"):
        load_extractor(tiny.base, *(f"twice={tiny.adapters['biqwen']}",) * 2)
    with pytest.raises(ValueError, match=r"is not NAME=PATH"):
        AdapterSpec.parse("colqwen")
    with pytest.raises(ValueError, match=r"adapter name 'a b'"):
        AdapterSpec.parse("a b=/x")
