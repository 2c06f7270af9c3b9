"""``embed_passages(adapter=...)`` on both clients against a real server on 127.0.0.1 serving the
tiny base with ColQwen2.5, BiQwen2.5 and jina-embeddings-v4 adapters: the adapter named reaches
the server, and overrides the one in ``options``.

The jina adapter embeds text documents: its passages equal ``extract`` of each text in the
document format with the same adapter and task (within 1e-5: the stream batches them). The
ColPali adapters embed none, so the server's answer names the adapter it ran with: its recipe's
refusal of a text document (or an unknown adapter's), never the raw base's "needs a retrieval
recipe" that a call without the adapter gets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from qwen25vl_embed import AsyncEmbeddingClient, EmbeddingClient, EmbeddingError, ExtractOptions
from qwen25vl_embed_server.core.fixtures.tiny_adapters import build_tiny_adapters
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model
from qwen25vl_embed_server.core.retrieval.adapter_spec import AdapterSpec
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import server_config

TEXTS = ["a passage about cats", "quarterly revenue rose"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    tiny = build_tiny_adapters(Path(tmp_path_factory.mktemp("adapters-client")), jina=True)
    specs = tuple(map(AdapterSpec.parse, tiny.flags()))
    model = load_model(LoadOptions(str(tiny.base), device="cpu", dtype="float32", adapters=specs))
    with BackgroundServer(Extractor(model), server_config()) as server:
        yield server


def _documents(client: EmbeddingClient, task: str) -> list[np.ndarray]:
    """Each text alone, in the document format, with the jina adapter and ``task``."""
    return [
        client.extract(
            None, prompt=text, prompt_format="document", outputs=["single_vector"], adapter="jina", task=task
        )["single_vector"]
        for text in TEXTS
    ]


def test_embed_passages_with_the_jina_adapter(shared: BackgroundServer) -> None:
    with EmbeddingClient(shared.address) as client:
        for task in ("code", "retrieval"):
            passages = client.embed_passages(TEXTS, adapter="jina", task=task)
            for got, want in zip(passages, _documents(client, task), strict=True):
                assert got.shape == want.shape
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        queries = client.embed_queries(TEXTS, adapter="jina", task="code")
        assert np.abs(client.embed_passages(TEXTS, adapter="jina", task="code")[0] - queries[0]).max() > 1e-3

        async def asynchronous() -> list[np.ndarray]:
            async with AsyncEmbeddingClient(shared.address) as aio:
                return await aio.embed_passages(TEXTS, adapter="jina", task="code")

        for got, want in zip(asyncio.run(asynchronous()), _documents(client, "code"), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _refusal(call: object) -> str:
    with pytest.raises(EmbeddingError) as caught:
        call()  # type: ignore[operator]
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return str(caught.value)


def test_embed_passages_sends_the_adapter(shared: BackgroundServer) -> None:
    with EmbeddingClient(shared.address) as client:
        assert "needs a retrieval recipe" in _refusal(lambda: client.embed_passages(TEXTS))
        assert "unknown adapter 'colpali'" in _refusal(lambda: client.embed_passages(TEXTS, adapter="colpali"))
        message = _refusal(lambda: client.embed_passages(TEXTS, adapter="biqwen"))
        assert "biqwen2.5 document format takes an image, not a text" in message
        overridden = _refusal(
            lambda: client.embed_passages(TEXTS, adapter="colqwen", options=ExtractOptions(adapter="colpali"))
        )
        assert "colqwen2.5 document format takes an image, not a text" in overridden
        from_options = _refusal(lambda: client.embed_passages(TEXTS, options=ExtractOptions(adapter="colpali")))
        assert "unknown adapter 'colpali'" in from_options


def test_the_async_client_sends_the_adapter(shared: BackgroundServer) -> None:
    async def refusals() -> list[str]:
        messages = []
        async with AsyncEmbeddingClient(shared.address) as client:
            for adapter in ("colpali", "biqwen"):
                with pytest.raises(EmbeddingError) as caught:
                    await client.embed_passages(TEXTS, adapter=adapter)
                assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
                messages.append(str(caught.value))
        return messages

    unknown, biqwen = asyncio.run(refusals())
    assert "unknown adapter 'colpali'" in unknown
    assert "biqwen2.5 document format takes an image, not a text" in biqwen
