"""Typed client SDK for the Qwen2.5-VL image-embedding service.

Example::

    from qwen25vl_embed import EmbeddingClient

    with EmbeddingClient("localhost:50051") as client:
        result = client.extract("cat.jpg", outputs=["projected_tokens", "lm_image_pooled_mean"])
        result.projected_tokens  # float32 [Nv, D]

:class:`AsyncEmbeddingClient` has the same methods for asyncio (``await client.extract(...)``).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from qwen25vl_embed.aio import AsyncEmbeddingClient
from qwen25vl_embed.client import EmbeddingClient
from qwen25vl_embed.embeddings import Embeddings, Timings
from qwen25vl_embed.errors import EmbeddingError
from qwen25vl_embed.images import ImageInput
from qwen25vl_embed.info import ServerInfo

try:
    __version__ = version("qwen25vl-embed")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = [
    "AsyncEmbeddingClient",
    "EmbeddingClient",
    "EmbeddingError",
    "Embeddings",
    "ImageInput",
    "ServerInfo",
    "Timings",
    "__version__",
]
