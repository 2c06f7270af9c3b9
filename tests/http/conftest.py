"""The HTTP API beside a real gRPC server on 127.0.0.1 (one process, one loop), serving the tiny
random-weight Qwen2.5-VL or ColQwen2.5; the gRPC side, through the real SDK, is the reference."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from PIL import Image

from qwen25vl_embed import EmbeddingClient
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.scheduling.batcher import BatchingConfig
from qwen25vl_embed_server.http.config import HTTPConfig
from qwen25vl_embed_server.http.serving import HTTPServer
from qwen25vl_embed_server.rpc.harness import BackgroundServer
from qwen25vl_embed_server.rpc.server import ServerConfig

from ..helpers import noise_image, png_bytes, server_config

TIMEOUT = 60.0


@dataclass
class Pair:
    """A gRPC server, its SDK client, and the HTTP API beside it."""

    grpc: BackgroundServer
    sdk: EmbeddingClient
    http: HTTPServer

    @property
    def url(self) -> str:
        return self.http.url


@pytest.fixture(scope="session")
def serving_pair() -> Any:
    """``with serving_pair(extractor, http=HTTPConfig(), client={...}, **server_config keywords) as pair:``
    (``client``: the SDK client's keywords, e.g. its TLS and token).

    One model lane unless told otherwise: a request run alone then takes every thread on either
    edge, so the two edges' single requests give the same bits."""

    class Serving:
        def __init__(
            self,
            extractor: Extractor,
            http: HTTPConfig | None = None,
            client: dict[str, Any] | None = None,
            **settings: Any,
        ) -> None:
            settings.setdefault("batching", BatchingConfig(lanes=1))
            config: ServerConfig = server_config(**settings)
            self.http = HTTPServer.beside(config, http or HTTPConfig())
            self.grpc = BackgroundServer(extractor, config, companions=[self.http])
            self.sdk: EmbeddingClient | None = None
            self.client = client or {}

        def __enter__(self) -> Pair:
            self.grpc.start()
            self.sdk = EmbeddingClient(self.grpc.address, **self.client)
            return Pair(self.grpc, self.sdk, self.http)

        def __exit__(self, *exc: object) -> None:
            if self.sdk is not None:
                self.sdk.close()
            self.grpc.stop()

    return Serving


@pytest.fixture(scope="session")
def pair(serving_pair: Any, extractor: Extractor) -> Iterator[Pair]:
    """The tiny raw checkpoint, gRPC and HTTP, default settings (one lane)."""
    with serving_pair(extractor, HTTPConfig(max_inputs=8)) as running:
        yield running


@pytest.fixture(scope="session")
def colqwen_pair(serving_pair: Any, colqwen: Extractor) -> Iterator[Pair]:
    """The tiny ColQwen2.5 (a multi-vector recipe), gRPC and HTTP."""
    with serving_pair(colqwen) as running:
        yield running


def image_png(seed: int, width: int = 56, height: int = 56) -> bytes:
    return png_bytes(noise_image(width, height, seed=seed))


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def image_message(data: bytes, text: str | None = None) -> list[dict[str, Any]]:
    """vLLM's chat-style embedding prompt: one user message, the image then the text."""
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(data)}}]
    if text is not None:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def unit(vector: np.ndarray) -> np.ndarray:
    """``vector`` L2-normalised, in float64 (an independent reference of the server's float32 one)."""
    wide = np.asarray(vector, np.float64).reshape(-1)
    normalized: np.ndarray = wide / np.linalg.norm(wide)
    return normalized


def open_png(data: bytes) -> Image.Image:
    import io

    return Image.open(io.BytesIO(data))


@pytest.fixture(scope="session")
def biqwen(tmp_path_factory: pytest.TempPathFactory) -> Extractor:
    """The tiny BiQwen2.5 (a single-vector recipe), fp32 on the CPU."""
    from qwen25vl_embed_server.core.fixtures.tiny_retrieval import build_tiny_retrieval
    from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model

    adapter = build_tiny_retrieval(tmp_path_factory.mktemp("biqwen"), "biqwen2.5")
    return Extractor(load_model(LoadOptions(model=str(adapter), device="cpu", dtype="float32")))


@pytest.fixture(scope="session")
def biqwen_pair(serving_pair: Any, biqwen: Extractor) -> Iterator[Pair]:
    with serving_pair(biqwen) as running:
        yield running


@pytest.fixture(scope="session")
def jina_pair(serving_pair: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """The tiny jina-embeddings-v4 (one vector by default, multi-vectors beside it), gRPC and HTTP."""
    from qwen25vl_embed_server.core.fixtures.tiny_jina import build_tiny_jina
    from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model

    path = build_tiny_jina(tmp_path_factory.mktemp("jina"))
    extractor = Extractor(load_model(LoadOptions(model=str(path), device="cpu", dtype="float32")))
    with serving_pair(extractor) as running:
        yield running
