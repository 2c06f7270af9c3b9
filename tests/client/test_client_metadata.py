"""``EmbeddingClient(metadata=...)`` sends its metadata with every call (unary, server-streaming,
bidirectional): e.g. Ray Serve's ``application`` key. Checked through a server that requires an
``authorization`` entry, so a call without it fails."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from qwen25vl_embed import EmbeddingClient, EmbeddingError, Embeddings
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.rpc.auth import AuthConfig
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import noise_image, png_bytes

TOKEN = "metadata-test-token"


def test_metadata_goes_with_every_call(extractor: Extractor, tiny_server: Callable[..., BackgroundServer]) -> None:
    image = png_bytes(noise_image(56, 56))
    with tiny_server(auth=AuthConfig((TOKEN,))) as server:
        metadata = [("authorization", f"Bearer {TOKEN}"), ("application", "qwen25vl_embed")]
        with EmbeddingClient(server.address, metadata=metadata) as sdk:
            assert sdk.info().num_lm_layers == extractor.num_lm_layers
            assert isinstance(sdk.extract(image), Embeddings)
            assert all(isinstance(result, Embeddings) for result in sdk.extract_many([image, image]))
        with EmbeddingClient(server.address) as sdk, pytest.raises(EmbeddingError) as refused:
            sdk.extract(image)
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
