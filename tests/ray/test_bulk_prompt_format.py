"""The bulk actor's prompt format, without a Ray cluster: on ColQwen2.5, ``auto`` writes the rows
``embed_images`` returns (the recipe's document template); the format is resolved per model."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from qwen25vl_embed import EmbeddingClient
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.loading import LoadOptions
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import noise_image, server_config

pq = pytest.importorskip("pyarrow.parquet")

from qwen25vl_embed_server.ray.bulk_actor import BulkExtractionActor, request_format  # noqa: E402
from qwen25vl_embed_server.ray.bulk_job import BulkJob  # noqa: E402
from qwen25vl_embed_server.ray.parquet_format import iter_rows  # noqa: E402


@pytest.fixture(scope="module")
def colqwen_server(colqwen: Extractor) -> Iterator[BackgroundServer]:
    with BackgroundServer(colqwen, server_config()) as running:
        yield running


def _job(tmp_path: Path, load: LoadOptions | None = None, **fields: object) -> BulkJob:
    load = load or LoadOptions(model="unused")
    return BulkJob(source=str(tmp_path), output=tmp_path / "out", load=load, **fields)  # type: ignore[arg-type]


def test_auto_is_document_with_a_recipe_and_chat_without(tmp_path: Path) -> None:
    assert request_format(_job(tmp_path), has_recipe=True) == "document"
    assert request_format(_job(tmp_path), has_recipe=False) == "chat"
    assert request_format(_job(tmp_path, prompt="A photo."), has_recipe=False) == "chat"
    assert request_format(_job(tmp_path, prompt_format="chat", prompt="A photo."), has_recipe=True) == "chat"
    for chosen in ("auto", "document"):
        with pytest.raises(ValueError, match="--prompt-format chat"):
            request_format(_job(tmp_path, prompt_format=chosen, prompt="A photo."), has_recipe=True)


def test_the_actor_writes_the_document_vectors_of_embed_images(
    tmp_path: Path, colqwen_adapter: Path, colqwen_server: BackgroundServer
) -> None:
    import torch

    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    noise_image(300, 200, seed=1).save(paths[0])
    noise_image(448, 224, seed=2).save(paths[1])
    with EmbeddingClient(colqwen_server.address) as sdk:
        expected = list(sdk.embed_images(paths))
    job = _job(
        tmp_path,
        load=LoadOptions(model=str(colqwen_adapter), device="cpu", dtype="float32"),
        outputs=("multi_vector",),
        cpus_per_actor=float(torch.get_num_threads()),  # the actor sets torch's count: leave it as it is
    )
    tables = []
    # The actor caps the thread that calls it to one OpenMP thread, as Ray's: a thread of its own here.
    worker = threading.Thread(
        target=lambda: tables.append(BulkExtractionActor(job)({"path": np.array([str(p) for p in paths])}))
    )
    worker.start()
    worker.join()
    (job.output).mkdir()
    pq.write_table(tables[0], job.output / "rows.parquet")
    rows = {row.path: row for row in iter_rows(job.output)}
    for path, want in zip(paths, expected, strict=True):
        row = rows[str(path)]
        assert row.error is None
        got = row.tensors["multi_vector"]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_a_prompt_auto_would_drop_is_refused_before_ray_starts(tmp_path: Path, colqwen_adapter: Path) -> None:
    """Read from the checkpoint's files (no model loaded, no Ray): the job never starts."""
    from qwen25vl_embed_server.ray.bulk_job import check_prompt_format, run_bulk

    retrieval = LoadOptions(model=str(colqwen_adapter))
    for job in (
        _job(tmp_path, load=retrieval, prompt="A photo."),
        _job(tmp_path, load=LoadOptions(model="unused", recipe="biqwen2.5"), prompt="A photo."),
        _job(tmp_path, prompt="A photo.", adapter="colqwen"),
    ):
        with pytest.raises(ValueError, match="--prompt with --prompt-format auto, which is document for") as caught:
            run_bulk(job)
        assert "drop --prompt, or give --prompt-format chat" in str(caught.value)
        assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()
    check_prompt_format(_job(tmp_path, load=retrieval, prompt="A photo.", prompt_format="chat"))
    check_prompt_format(_job(tmp_path, load=retrieval))
    check_prompt_format(_job(tmp_path, load=LoadOptions(model=str(colqwen_adapter), recipe="none"), prompt="A photo."))


def test_a_plain_checkpoint_keeps_its_prompt(tmp_path: Path, tiny_model_path: Path) -> None:
    from qwen25vl_embed_server.ray.bulk_job import check_prompt_format

    check_prompt_format(_job(tmp_path, load=LoadOptions(model=str(tiny_model_path)), prompt="A photo."))
    check_prompt_format(_job(tmp_path, load=LoadOptions(model="org/not-a-local-folder"), prompt="A photo."))


def test_the_bulk_command_exits_2_with_one_line(
    tmp_path: Path, colqwen_adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from qwen25vl_embed_server.cli.app import main

    noise_image(64, 64, seed=3).save(tmp_path / "a.png")
    argv = ["bulk", str(tmp_path), str(tmp_path / "out"), "--model", str(colqwen_adapter), "--prompt", "A photo."]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: --prompt with --prompt-format auto, which is document for the colqwen2.5 ")
    assert not (tmp_path / "out").exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
