"""``extract --prompt-format``: on a retrieval checkpoint, auto writes the recipe's document vectors
(what ``embed_images`` returns), in-process and through a server; on a plain one, the chat outputs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from qwen25vl_embed import EmbeddingClient
from qwen25vl_embed_server.cli import main
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import noise_image, server_config


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / "in" / "cat.png", tmp_path / "in" / "wide.png"]
    paths[0].parent.mkdir()
    noise_image(300, 200, seed=1).save(paths[0])
    noise_image(448, 224, seed=2).save(paths[1])
    return paths


@pytest.fixture(scope="module")
def colqwen_server(colqwen: Extractor) -> Iterator[BackgroundServer]:
    with BackgroundServer(colqwen, server_config()) as running:
        yield running


def _vectors(outdir: Path, images: list[Path]) -> list[np.ndarray]:
    return [np.load(outdir / path.stem / "multi_vector.npy") for path in images]


@pytest.mark.parametrize("where", ["in-process", "server"])
def test_auto_on_colqwen_writes_the_document_vectors_of_embed_images(
    tmp_path: Path, images: list[Path], colqwen_adapter: Path, colqwen_server: BackgroundServer, where: str
) -> None:
    with EmbeddingClient(colqwen_server.address) as sdk:
        expected = list(sdk.embed_images(images))
    target = ["--server", colqwen_server.address] if where == "server" else ["--model", str(colqwen_adapter)]
    outdir = tmp_path / "out"
    assert main(["extract", *map(str, images), "--outputs", "multi_vector", "--outdir", str(outdir), *target]) == 0
    written = _vectors(outdir, images)
    for got, want in zip(written, expected, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    manifest = json.loads((outdir / "cat" / "manifest.json").read_text())
    assert manifest["prompt_format"] == "document"
    assert "prompt" not in manifest  # the recipe's template is the text


def test_chat_on_colqwen_differs_from_the_document_vectors(
    tmp_path: Path, images: list[Path], colqwen_server: BackgroundServer
) -> None:
    """The choice reaches the server: the chat template gives other vectors (more tokens too)."""
    with EmbeddingClient(colqwen_server.address) as sdk:
        expected = list(sdk.embed_images(images[:1]))
        chat = sdk.extract(images[0], outputs=["multi_vector"], prompt_format="chat")["multi_vector"]
    outdir = tmp_path / "out"
    common = [str(images[0]), "--outputs", "multi_vector", "--server", colqwen_server.address]
    assert main(["extract", *common, "--prompt-format", "chat", "--outdir", str(outdir)]) == 0
    (got,) = _vectors(outdir, images[:1])
    np.testing.assert_allclose(got, chat, rtol=0, atol=1e-5)
    assert got.shape != expected[0].shape or not np.allclose(got, expected[0], atol=1e-3)


def test_auto_on_the_plain_model_keeps_the_chat_outputs(
    tmp_path: Path, images: list[Path], tiny_model_path: Path, client: EmbeddingClient
) -> None:
    outdir = tmp_path / "out"
    assert main(["extract", str(images[0]), "--outdir", str(outdir), "--model", str(tiny_model_path)]) == 0
    chat = client.extract(images[0], prompt_format="chat")
    for name in chat.names:
        np.testing.assert_allclose(np.load(outdir / "cat" / f"{name}.npy"), chat[name], rtol=0, atol=1e-5)
    manifest = json.loads((outdir / "cat" / "manifest.json").read_text())
    assert manifest["prompt_format"] == "chat"
    assert manifest["prompt"] == "Describe the image."


def test_prompt_with_document_is_refused_naming_both_flags(
    tmp_path: Path, images: list[Path], colqwen_adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["extract", str(images[0]), "--outdir", str(tmp_path / "out"), "--model", str(colqwen_adapter)]
    assert main([*base, "--prompt", "A photo.", "--prompt-format", "document"]) == 2
    err = capsys.readouterr().err
    assert "--prompt" in err
    assert "--prompt-format document" in err
    assert main([*base, "--prompt", "A photo."]) == 2  # auto is document here
    err = capsys.readouterr().err
    assert "--prompt-format auto" in err
    assert "--prompt-format chat" in err
    assert not (tmp_path / "out").exists()


def test_document_on_a_model_without_a_recipe_is_the_servers_error(
    tmp_path: Path, images: list[Path], server: BackgroundServer, capsys: pytest.CaptureFixture[str]
) -> None:
    outdir = tmp_path / "out"
    args = [
        "extract",
        str(images[0]),
        "--outdir",
        str(outdir),
        "--server",
        server.address,
        "--prompt-format",
        "document",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{images[0]}:" in err
    assert "needs a retrieval recipe" in err
    assert "INVALID_ARGUMENT" in err
