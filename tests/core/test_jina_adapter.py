"""jina-embeddings-v4 as an adapter on a shared base, beside ColQwen2.5 and BiQwen2.5 adapters.

One base in memory (the tiny ColQwen2.5 base), three adapters: ``colqwen``, ``biqwen`` and
``jina`` (a jina-embeddings-v4 folder whose base weights are that base's). Each jina task equals
the independent reference (transformers + peft, each task a peft adapter: ``tests/jina_reference.py``)
within 1e-5 (fp32); each ColQwen2.5 / BiQwen2.5 adapter equals the model loaded with it alone. The
same holds in batches that mix every adapter, every task and the raw base, run both ways (each
LoRA on its rows in one forward, or one forward per LoRA).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qwen25vl_embed_server.core.errors import InvalidInputError, ModelLoadError
from qwen25vl_embed_server.core.fixtures.tiny_adapters import TinyAdapters, build_tiny_adapters
from qwen25vl_embed_server.core.fixtures.tiny_jina import build_tiny_jina
from qwen25vl_embed_server.core.model.extractor import Extractor, Prepared
from qwen25vl_embed_server.core.model.finishing import Extraction
from qwen25vl_embed_server.core.model.output_settings import OutputSettings

from ..helpers import assert_batched_close, load_extractor, noise_image
from ..jina_reference import TASKS, Reference

IMAGES = (noise_image(224, 224, seed=21), noise_image(168, 112, seed=22))
TEXTS = ("where is the cat", "tables of quarterly revenue")
RAW = ["lm_last_token", "lm_pooled_mean"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyAdapters:
    return build_tiny_adapters(tmp_path_factory.mktemp("three-adapters"), jina=True)


@pytest.fixture(scope="module")
def shared(tiny: TinyAdapters) -> Extractor:
    return load_extractor(tiny.base, *tiny.flags())


@pytest.fixture(scope="module")
def reference(tiny: TinyAdapters) -> Reference:
    return Reference(tiny.adapters["jina"])


@pytest.fixture(scope="module")
def alone(tiny: TinyAdapters) -> dict[str, Extractor]:
    """ColQwen2.5 and BiQwen2.5 each loaded alone (LoRA merged), and the base as raw states ("")."""
    return {name: load_extractor(tiny.adapters[name]) for name in ("colqwen", "biqwen")} | {
        "": load_extractor(tiny.base, recipe="none")
    }


# One request: (adapter or "" for the raw base, task, image index or None, text index)
Case = tuple[str, str, int | None, int]
JINA_CASES: list[Case] = [("jina", task, image, 0) for task in TASKS for image in (0, 1, None)]
JINA_CASES += [("jina", task, None, 1) for task in TASKS]
OTHER_CASES: list[Case] = [(name, "", image, 0) for name in ("colqwen", "biqwen", "") for image in (0, None)]


def _prepare(extractor: Extractor, case: Case, served_alone: bool = False) -> Prepared:
    """``case`` for ``extractor``: on the shared base, or on a model that serves the adapter alone."""
    adapter, task, image, text = case
    if not adapter:
        raw = extractor.plan(RAW, has_images=image is not None)
        return extractor.prepare([IMAGES[image]] if image is not None else [], TEXTS[text], raw)
    outputs = ["single_vector", "multi_vector"] if adapter == "jina" else []
    adapter = "" if served_alone else adapter
    plan = extractor.plan(outputs, has_images=image is not None, adapter=adapter) if outputs else None
    if image is not None:
        return extractor.prepare([IMAGES[image]], "", plan, prompt_format="document", adapter=adapter, task=task)
    return extractor.prepare([], TEXTS[text], plan, prompt_format="query", adapter=adapter, task=task)


@pytest.fixture(scope="module")
def expected(reference: Reference, alone: dict[str, Extractor]) -> dict[Case, Any]:
    found: dict[Case, Any] = {}
    for case in JINA_CASES:
        _, task, image, text = case
        found[case] = reference.embed(task, IMAGES[image] if image is not None else None, TEXTS[text])
    for case in OTHER_CASES:
        found[case] = alone[case[0]].run([_prepare(alone[case[0]], case, served_alone=True)])[0]
    return found


def _check(case: Case, result: Extraction, want: Any) -> None:
    if case[0] == "jina":
        assert result.tensors["single_vector"].shape == (1, 64)
        assert_batched_close(result.tensors["single_vector"][0], want["single"], f"{case} single")
        assert_batched_close(result.tensors["multi_vector"], want["multi"], f"{case} multi")
        return
    assert result.tensors.keys() == want.tensors.keys(), case
    for name, array in want.tensors.items():
        assert_batched_close(result.tensors[name], array, f"{case} {name}")


def test_info_lists_the_jina_adapter_with_its_tasks(shared: Extractor) -> None:
    adapters = {adapter.name: adapter.recipe for adapter in shared.info().adapters}
    assert list(adapters) == ["colqwen", "biqwen", "jina"]
    jina = adapters["jina"]
    assert (jina.name, jina.tasks, jina.matryoshka_dims, jina.dimension) == ("jina-v4", TASKS, (4, 8, 16, 32, 64), 64)
    assert jina.outputs == ("single_vector", "multi_vector")
    assert (adapters["colqwen"].tasks, adapters["biqwen"].tasks) == ((), ())
    assert {"single_vector", "multi_vector"} <= set(shared.info().outputs)


@pytest.mark.parametrize("mode", ["alone", "mixed", "grouped"])
def test_every_adapter_and_task_equals_its_reference(shared: Extractor, expected: dict[Case, Any], mode: str) -> None:
    cases = [*JINA_CASES, *OTHER_CASES]
    # Interleaved, so that a batch holds every adapter and task in no particular order.
    cases = cases[::2] + cases[1::2]
    prepared = [_prepare(shared, case) for case in cases]
    if mode == "alone":
        results = [shared.run([item])[0] for item in prepared]
    else:
        shared.adapter_batching = mode
        try:
            results = shared.run(prepared)
        finally:
            shared.adapter_batching = "mixed"
    for case, result in zip(cases, results, strict=True):
        _check(case, result, expected[case])


def test_matryoshka_sizes_of_the_jina_adapter(shared: Extractor, reference: Reference) -> None:
    want = reference.embed("code", None, TEXTS[1])["single"][:16]
    plan = shared.plan(["single_vector"], has_images=False, adapter="jina")
    settings = OutputSettings(dimensions=16)
    item = shared.prepare([], TEXTS[1], plan, settings, prompt_format="query", adapter="jina", task="code")
    result = shared.run([item])[0].tensors["single_vector"][0]
    assert_batched_close(result, want / (want**2).sum() ** 0.5, "code at 16")


@pytest.mark.parametrize(
    ("adapter", "task", "dimensions", "message"),
    [
        ("jina", "summarise", 0, "unknown task 'summarise'; expected one of retrieval, text-matching, code"),
        ("colqwen", "retrieval", 0, "task 'retrieval' is not available: its recipe colqwen2.5 has none"),
        ("", "retrieval", 0, "task 'retrieval' is not available"),
        ("jina", "code", 12, "dimensions=12 is not one of jina-v4's Matryoshka sizes: 4, 8, 16, 32, 64"),
        ("nope", "", 0, "unknown adapter 'nope'; this server's adapters: colqwen, biqwen, jina"),
    ],
)
def test_bad_requests_are_refused(shared: Extractor, adapter: str, task: str, dimensions: int, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(")):
        shared.prepare([], "a query", settings=OutputSettings(dimensions=dimensions), adapter=adapter, task=task)


def test_a_recipe_output_of_the_raw_base_is_refused(shared: Extractor) -> None:
    with pytest.raises(InvalidInputError, match=r"output 'single_vector' needs an adapter.*colqwen, biqwen, jina"):
        shared.plan(["single_vector"])


def test_a_jina_folder_on_another_base_is_refused_naming_both(tiny: TinyAdapters, tmp_path: Path) -> None:
    other = build_tiny_jina(tmp_path / "other-jina", seed=7)
    with pytest.raises(ModelLoadError) as raised:
        load_extractor(tiny.base, f"other={other}")
    message = str(raised.value)
    assert f"--adapter other={other}" in message
    assert str(other) in message
    assert str(tiny.base) in message
    assert "differ" in message


def test_a_jina_folder_without_a_listed_task_is_refused(tiny: TinyAdapters, tmp_path: Path) -> None:
    folder = tmp_path / "jina-more-tasks"
    source = tiny.adapters["jina"]
    folder.mkdir()
    for file in source.rglob("*"):
        if file.is_file():
            (folder / file.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            (folder / file.relative_to(source)).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["task_names"] = [*TASKS, "summarise"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="no LoRA for task 'summarise'"):
        load_extractor(tiny.base, f"jina={folder}")


def test_a_jina_request_in_pieces_equals_the_reference(shared: Extractor, reference: Reference) -> None:
    """A large request runs in pieces (vision a few images at a time, then the LM) with its task's LoRA."""
    plan = shared.plan(["single_vector", "multi_vector"], adapter="jina")
    item = shared.prepare([IMAGES[0]], "", plan, prompt_format="document", adapter="jina", task="text-matching")
    assert shared.pieces(item, 40) > 1
    run = shared.run_in_pieces(item, max_piece_tokens=40)
    result = None
    while result is None:
        result = run.step()
    want = reference.embed("text-matching", IMAGES[0])
    assert_batched_close(result.tensors["single_vector"][0], want["single"], "pieces single")
    assert_batched_close(result.tensors["multi_vector"], want["multi"], "pieces multi")
