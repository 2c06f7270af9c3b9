"""jina-embeddings-v4 served from one folder in its published layout, every task from one model.

The reference is written here from the published recipe, independently of the server: transformers'
Qwen2.5-VL with the base weights, each task a standard peft LoRA adapter (``set_adapter``) on the
language model and the projector, the pooling as the recipe states it (the mean over the image's
vision span, or over a text's tokens; L2; Matryoshka truncation then L2; the projector's rows L2).
Each request runs alone in the reference; the server runs it alone, batched, and in batches that
mix tasks (each row its task's LoRA, or one forward per task): within 1e-5 (fp32).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qwen25vl_embed_server.core.errors import InvalidInputError, ModelLoadError
from qwen25vl_embed_server.core.fixtures.tiny_jina import build_tiny_jina
from qwen25vl_embed_server.core.model.extractor import Extractor, Prepared
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model
from qwen25vl_embed_server.core.model.output_settings import OutputSettings

from ..helpers import assert_batched_close, noise_image
from ..jina_reference import TASKS, Reference

IMAGES = [noise_image(224, 224, seed=11), noise_image(300, 140, seed=12)]
TEXTS = ["where is the cat", "a chart of quarterly revenue by region, 2024"]


@pytest.fixture(scope="module")
def jina_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_jina(tmp_path_factory.mktemp("jina"))


@pytest.fixture(scope="module")
def jina(jina_path: Path) -> Extractor:
    return Extractor(load_model(LoadOptions(model=str(jina_path), device="cpu", dtype="float32")))


@pytest.fixture(scope="module")
def reference(jina_path: Path) -> Reference:
    return Reference(jina_path)


# (task, image index or None, text index or None, passage)
Case = tuple[str, int | None, int | None, bool]
CASES: list[Case] = [(task, image, None, False) for task in TASKS for image in range(len(IMAGES))]
CASES += [(task, None, text, passage) for task in TASKS for text in range(len(TEXTS)) for passage in (False, True)]


def _prepare(jina: Extractor, case: Case, **settings: Any) -> Prepared:
    task, image, text, passage = case
    outputs = ["single_vector", "multi_vector"] if not settings else ["single_vector"]
    plan = jina.plan(outputs, has_images=image is not None)
    if image is not None:
        return jina.prepare([IMAGES[image]], "", plan, prompt_format="document", task=task)
    assert text is not None
    prompt_format = "document" if passage else "query"
    return jina.prepare([], TEXTS[text], plan, OutputSettings(**settings), prompt_format=prompt_format, task=task)


def _expected(reference: Reference, case: Case) -> dict[str, Any]:
    task, image, text, passage = case
    return reference.embed(task, IMAGES[image] if image is not None else None, TEXTS[text or 0], passage)


@pytest.fixture(scope="module")
def expected(reference: Reference) -> list[dict[str, Any]]:
    return [_expected(reference, case) for case in CASES]


def test_the_recipe_reads_the_checkpoint(jina: Extractor) -> None:
    recipe = jina.loaded.recipe
    assert recipe is not None
    assert recipe.name == "jina-v4"
    assert recipe.tasks == TASKS
    assert recipe.matryoshka_dims == (4, 8, 16, 32, 64)  # the published sizes scaled to hidden 64
    info = jina.info()
    assert info.default_outputs == ("single_vector",)
    assert "multi_vector" in info.outputs
    assert info.recipe is not None
    assert info.recipe.dimension == 64


def test_texts_are_prefixed_as_published(jina: Extractor, expected: list[dict[str, Any]]) -> None:
    tokenizer = jina.loaded.processor.tokenizer
    for case, want in zip(CASES, expected, strict=True):
        prepared = _prepare(jina, case)
        assert tokenizer.decode(prepared.inputs["input_ids"][0]) == want["text"], case


@pytest.mark.parametrize("mode", ["alone", "mixed", "grouped"])
def test_every_task_equals_the_reference(jina: Extractor, expected: list[dict[str, Any]], mode: str) -> None:
    prepared = [_prepare(jina, case) for case in CASES]
    if mode == "alone":
        results = [jina.run([item])[0] for item in prepared]
    else:
        jina.adapter_batching = mode
        try:
            results = jina.run(prepared)
        finally:
            jina.adapter_batching = "mixed"
    for case, result, want in zip(CASES, results, expected, strict=True):
        assert result.tensors["single_vector"].shape == (1, 64)
        assert_batched_close(result.tensors["single_vector"][0], want["single"], f"{case} single")
        assert_batched_close(result.tensors["multi_vector"], want["multi"], f"{case} multi")


def test_a_batch_of_texts_mixes_tasks_in_one_forward(jina: Extractor, expected: list[dict[str, Any]]) -> None:
    """Texts of one length and three tasks: one padded forward, each row its task's LoRA."""
    chosen = [i for i, case in enumerate(CASES) if case[1] is None and case[2] == 0 and not case[3]]
    assert {CASES[i][0] for i in chosen} == set(TASKS)
    results = jina.run([_prepare(jina, CASES[i]) for i in chosen])
    for i, result in zip(chosen, results, strict=True):
        assert_batched_close(result.tensors["single_vector"][0], expected[i]["single"], str(CASES[i]))


def test_tasks_give_different_vectors(expected: list[dict[str, Any]]) -> None:
    by_task = {case[0]: want["single"] for case, want in zip(CASES, expected, strict=True) if case[1] == 0}
    assert not np.allclose(by_task["retrieval"], by_task["code"], atol=1e-3)


@pytest.mark.parametrize("dimensions", [4, 16, 64])
def test_matryoshka_sizes(jina: Extractor, expected: list[dict[str, Any]], dimensions: int) -> None:
    index = CASES.index(("code", None, 1, True))
    result = jina.run([_prepare(jina, CASES[index], dimensions=dimensions)])[0]
    want = expected[index]["single"][:dimensions]
    assert_batched_close(result.tensors["single_vector"][0], want / np.linalg.norm(want), f"{dimensions}")


def test_transformers5_names_load_the_same_model(tmp_path: Path, jina: Extractor) -> None:
    path = build_tiny_jina(tmp_path / "t5", transformers5_names=True)
    other = Extractor(load_model(LoadOptions(model=str(path), device="cpu", dtype="float32")))
    case = ("text-matching", 0, None, False)
    ours, theirs = jina.run([_prepare(jina, case)])[0], other.run([_prepare(other, case)])[0]
    np.testing.assert_array_equal(ours.tensors["multi_vector"], theirs.tensors["multi_vector"])


@pytest.mark.parametrize(
    ("task", "settings", "outputs", "message"),
    [
        ("summarize", {}, [], "unknown task 'summarize'; expected one of retrieval, text-matching, code"),
        ("retrieval", {"dimensions": 5}, [], "dimensions=5 is not one of jina-v4's Matryoshka sizes: 4, 8, 16, 32, 64"),
        ("retrieval", {"dimensions": 8}, ["multi_vector"], "dimensions applies to jina-v4's single_vector only"),
    ],
)
def test_bad_requests_are_refused(
    jina: Extractor, task: str, settings: dict[str, Any], outputs: list[str], message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(")):
        jina.prepare([], "x", jina.plan(outputs, has_images=False), OutputSettings(**settings), task=task)


def test_a_task_the_checkpoint_lacks(tmp_path: Path) -> None:
    path = build_tiny_jina(tmp_path / "two", tasks=("retrieval", "text-matching"))
    two = Extractor(load_model(LoadOptions(model=str(path), device="cpu", dtype="float32")))
    assert two.loaded.recipe is not None
    assert two.loaded.recipe.tasks == ("retrieval", "text-matching")
    with pytest.raises(InvalidInputError, match="this model lacks task 'code'; its tasks: retrieval, text-matching"):
        two.prepare([], "x", prompt_format="query", task="code")


def test_a_task_on_a_model_without_tasks(colqwen: Extractor) -> None:
    with pytest.raises(InvalidInputError, match=r"task 'code' is not available: its recipe colqwen2\.5 has none"):
        colqwen.prepare([], "x", prompt_format="query", task="code")
    with pytest.raises(InvalidInputError, match=r"the colqwen2\.5 document format takes an image, not a text"):
        colqwen.prepare([], "x", prompt_format="document")


def test_recipes_that_do_not_fit_the_folder_are_refused(jina_path: Path, colqwen_adapter: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"recipe colqwen2\.5 cannot serve .*: it is a jina-embeddings-v4 folder"):
        load_model(LoadOptions(model=str(jina_path), device="cpu", recipe="colqwen2.5"))
    with pytest.raises(ModelLoadError, match="recipe jina-v4 needs a folder in jina-embeddings-v4's layout"):
        load_model(LoadOptions(model=str(colqwen_adapter), device="cpu", recipe="jina-v4"))


def test_the_command_line_builds_serves_and_extracts_with_a_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from qwen25vl_embed_server.cli.app import build_parser, main
    from qwen25vl_embed_server.cli.commands import load_options

    assert main(["make-tiny-model", str(tmp_path / "jina"), "--recipe", "jina-v4"]) == 0
    folder = capsys.readouterr().out.strip()
    assert folder == str(tmp_path / "jina")  # the folder to serve; its task LoRAs in adapters/
    args = build_parser().parse_args(["serve", "--model", folder, "--device", "cpu"])
    served = Extractor(load_model(load_options(args)))
    assert served.loaded.recipe is not None
    assert (served.loaded.recipe.name, served.loaded.recipe.tasks) == ("jina-v4", TASKS)

    IMAGES[1].save(tmp_path / "page.png")
    extract = ["extract", str(tmp_path / "page.png"), "--model", folder, "--device", "cpu", "--flat"]
    extract += ["--outputs", "single_vector"]
    assert main([*extract, "--task", "code", "--outdir", str(tmp_path / "out")]) == 0
    saved = np.load(tmp_path / "out" / "page" / "single_vector.npy")
    # On a retrieval model extract's prompt format is the document's (--prompt-format auto).
    plan = served.plan(["single_vector"], has_images=True)
    expected = served.run([served.prepare([IMAGES[1]], "", plan, prompt_format="document", task="code")])[0]
    assert_batched_close(saved, expected.tensors["single_vector"], "extract --task code")
    assert main([*extract, "--task", "summarize", "--outdir", str(tmp_path / "bad")]) != 0
    assert "unknown task 'summarize'" in capsys.readouterr().err


def test_each_output_is_a_composition_of_head_steps(jina: Extractor, colqwen: Extractor) -> None:
    from qwen25vl_embed_server.core.retrieval.heads import Normalize, Pool, Project, Rows, Truncate, recipe_heads

    def kinds(extractor: Extractor) -> dict[str, list[type]]:
        loaded = extractor.loaded
        assert loaded.recipe is not None
        heads = recipe_heads(loaded.recipe, loaded.head, loaded.model.config)
        return {name: [type(step) for step in head.steps] for name, head in heads.items()}

    assert kinds(jina) == {
        "multi_vector": [Project, Normalize, Rows, Truncate],
        "single_vector": [Pool, Normalize, Truncate],
    }
    assert kinds(colqwen) == {"multi_vector": [Project, Normalize, Rows, Truncate]}
