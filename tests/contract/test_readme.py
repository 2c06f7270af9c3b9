"""Every Python code block of the README and of the docs pages (``docs/*.md``) runs as written,
against live tiny servers, so the docs cannot drift from the SDK.

The blocks name ``localhost:50051`` (and ``127.0.0.1:50051`` / ``:50052`` for two servers, and
``localhost:50061`` for a retrieval model, ``localhost:50071`` for jina-embeddings-v4,
``localhost:50081`` for a base with ColQwen2.5, BiQwen2.5 and jina-embeddings-v4 adapters,
``http://localhost:8000`` for the HTTP API beside a server); the test
starts servers on free ports (those two on the tiny ColQwen2.5 and the tiny jina-embeddings-v4) and
points those addresses at them, and runs each block in a
folder holding the bundled ``examples/images/``, as in a clone of the repository: the blocks name
no other image.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import server_config

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = (README, *sorted((ROOT / "docs").glob("*.md")))
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
BLOCKS = [
    (f"{page.relative_to(ROOT)} python block {index}", block)
    for page in PAGES
    for index, block in enumerate(_BLOCK.findall(page.read_text()))
]


def test_the_readme_has_the_python_blocks_this_test_runs() -> None:
    readme = [name for name, _ in BLOCKS if name.startswith("README.md")]
    assert len(readme) >= 3  # the SDK, asyncio and retrieval samples


def test_the_docs_have_the_python_blocks_this_test_runs() -> None:
    pages = {name.partition(" ")[0] for name, _ in BLOCKS}
    # The SDK, the first vector, a real checkpoint's info, retrieval, load balancing.
    assert {
        "docs/sdk.md",
        "docs/getting-started.md",
        "docs/checkpoints.md",
        "docs/retrieval.md",
        "docs/scaling.md",
    } <= pages


@pytest.fixture(scope="module")
def second_server(tiny_server: Callable[..., BackgroundServer]) -> Iterator[BackgroundServer]:
    with tiny_server() as running:
        yield running


@pytest.fixture(scope="module")
def retrieval_server(colqwen: Extractor) -> Iterator[BackgroundServer]:
    with BackgroundServer(colqwen, server_config()) as running:
        yield running


@pytest.fixture(scope="module")
def jina_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    from qwen25vl_embed_server.core.fixtures.tiny_jina import build_tiny_jina
    from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model

    path = build_tiny_jina(tmp_path_factory.mktemp("jina"))
    extractor = Extractor(load_model(LoadOptions(model=str(path), device="cpu", dtype="float32")))
    with BackgroundServer(extractor, server_config()) as running:
        yield running


@pytest.fixture(scope="module")
def adapters_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    """The tiny base with ColQwen2.5, BiQwen2.5 and jina-embeddings-v4 adapters (``serve --adapter NAME=PATH``)."""
    from qwen25vl_embed_server.core.fixtures.tiny_adapters import build_tiny_adapters
    from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model
    from qwen25vl_embed_server.core.retrieval.adapter_spec import AdapterSpec

    tiny = build_tiny_adapters(tmp_path_factory.mktemp("adapters"), jina=True)
    specs = tuple(map(AdapterSpec.parse, tiny.flags()))
    options = LoadOptions(str(tiny.base), device="cpu", dtype="float32", adapters=specs)
    with BackgroundServer(Extractor(load_model(options)), server_config()) as running:
        yield running


@pytest.fixture(scope="module")
def http_server(extractor: Extractor) -> Iterator[str]:
    """The HTTP API beside a tiny server (``serve --http-port``): its base URL."""
    from qwen25vl_embed_server.http.config import HTTPConfig
    from qwen25vl_embed_server.http.serving import HTTPServer

    config = server_config()
    http = HTTPServer.beside(config, HTTPConfig())
    with BackgroundServer(extractor, config, companions=[http]):
        yield http.url


@pytest.mark.parametrize(("name", "block"), BLOCKS, ids=[name for name, _ in BLOCKS])
def test_python_block_runs_as_written(
    name: str,
    block: str,
    tmp_path: Path,
    server: BackgroundServer,
    second_server: BackgroundServer,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port, second_port = server.address.rpartition(":")[2], second_server.address.rpartition(":")[2]
    if "localhost:50061" in block:  # started only for the blocks that need it
        retrieval: BackgroundServer = request.getfixturevalue("retrieval_server")
        block = block.replace("localhost:50061", retrieval.address)
    if "http://localhost:8000" in block:  # the HTTP API (docs/http.md)
        block = block.replace("http://localhost:8000", request.getfixturevalue("http_server"))
    if "localhost:50081" in block:
        adapters: BackgroundServer = request.getfixturevalue("adapters_server")
        block = block.replace("localhost:50081", adapters.address)
    if "localhost:50071" in block:
        jina: BackgroundServer = request.getfixturevalue("jina_server")
        block = block.replace("localhost:50071", jina.address)
    source = (
        block.replace("localhost:50051", server.address)
        .replace("127.0.0.1:50051", f"127.0.0.1:{port}")
        .replace("127.0.0.1:50052", f"127.0.0.1:{second_port}")
    )
    shutil.copytree(ROOT / "examples" / "images", tmp_path / "examples" / "images")
    monkeypatch.chdir(tmp_path)
    exec(compile(source, name, "exec"), {"__name__": "__readme__"})
    assert "Error" not in capsys.readouterr().out  # extract_many(errors="return") printed no failure
