"""Typed client SDK for the Qwen2.5-VL image-embedding service.

Example::

    from qwen25vl_embed import EmbeddingClient

    with EmbeddingClient("localhost:50051") as client:
        result = client.extract("cat.jpg", outputs=["projected_tokens", "lm_image_pooled_mean"])
        result.projected_tokens  # float32 [Nv, D]

:class:`AsyncEmbeddingClient` has the same methods for asyncio (``await client.extract(...)``).

The SDK is light: it depends on grpcio, protobuf and numpy (with ml_dtypes for bfloat16, Pillow
for image inputs and tqdm for progress bars), never on torch or transformers. Its modules, one job
each:

- :mod:`~qwen25vl_embed.frontend`: both clients' constructor and request methods, written once;
  :mod:`~qwen25vl_embed.client`, :mod:`~qwen25vl_embed.aio`: their blocking and asyncio transports.
- :mod:`~qwen25vl_embed.options`: :class:`ExtractOptions`, one request's settings as one value;
  :mod:`~qwen25vl_embed.choices`: the Enums :class:`PromptFormat`, :class:`VectorEncoding`,
  :class:`Arithmetic`.
- :mod:`~qwen25vl_embed.requests`: settings -> validated ``ImageRequest``.
- :mod:`~qwen25vl_embed.images`: the accepted image kinds -> ``Image`` messages.
- :mod:`~qwen25vl_embed.assembly`: a response stream -> :class:`Embeddings`.
- :mod:`~qwen25vl_embed.extract_many`: in-order results and error policy of ``extract_many``.
- :mod:`~qwen25vl_embed.embeddings`: the result value; :mod:`~qwen25vl_embed.on_disk`: its
  ``*.npy`` + ``manifest.json`` format.
- :mod:`~qwen25vl_embed.search`: MaxSim scoring and token pooling of retrieval vectors
  (``embed_queries`` / ``embed_images`` on the clients produce them).
- :mod:`~qwen25vl_embed.codec`: numpy array <-> ``Tensor`` message (shared with the server).
- :mod:`~qwen25vl_embed.channels`, :mod:`~qwen25vl_embed.errors`, :mod:`~qwen25vl_embed.info`:
  channels (TLS, tokens), :class:`EmbeddingError`, :class:`ServerInfo`.
- :mod:`~qwen25vl_embed.retries`: :class:`RetryPolicy`, gRPC's retries of refused calls (on by default).

``qwen25vl_embed.v1`` is the code generated from ``protos/`` (messages and service stub).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from qwen25vl_embed.aio import AsyncEmbeddingClient
from qwen25vl_embed.choices import Arithmetic, PromptFormat, VectorEncoding
from qwen25vl_embed.client import EmbeddingClient
from qwen25vl_embed.embeddings import Embeddings, Timings
from qwen25vl_embed.errors import EmbeddingError, LocalRequestError
from qwen25vl_embed.images import ImageInput
from qwen25vl_embed.info import RetrievalRecipe, ServedAdapter, ServerInfo
from qwen25vl_embed.options import ExtractOptions
from qwen25vl_embed.retries import RetryPolicy
from qwen25vl_embed.search import maxsim, pool_tokens, storage_bytes

try:
    __version__ = version("qwen25vl-embed")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = [
    "Arithmetic",
    "AsyncEmbeddingClient",
    "EmbeddingClient",
    "EmbeddingError",
    "Embeddings",
    "ExtractOptions",
    "ImageInput",
    "LocalRequestError",
    "PromptFormat",
    "RetrievalRecipe",
    "RetryPolicy",
    "ServedAdapter",
    "ServerInfo",
    "Timings",
    "VectorEncoding",
    "__version__",
    "maxsim",
    "pool_tokens",
    "storage_bytes",
]
