"""The Qwen2.5-VL embedding server: the extraction core and the edges that serve it.

Rooms, each importing only those before it (``docs/architecture.md``; ``tests/contract/test_layers.py``
checks it):

- :mod:`.core`: model loading, the offline tiny model, image decoding, prompt and processor, limits,
  outputs, capture hooks, the extractor, the batcher and the one request pipeline. No gRPC and no
  generated code.
- :mod:`.rpc`: the gRPC edge: servicer, error mapping, server assembly, auth, TLS, observation,
  metrics, and the harness that runs a server beside your code. Uses ``qwen25vl_embed`` (the SDK
  package, which owns the generated ``qwen25vl_embed.v1``) for the messages and the codec.
- :mod:`.ray`: Ray Serve deployment and its deploy driver, the Ray Data bulk job and its Parquet
  format (the ``ray`` extra).
- :mod:`.cli`: the ``qwen25vl-embed`` command.

The names below are the entry points for code that embeds the server; they load lazily, so
importing this package costs nothing (the CLI imports torch only for commands that need it) but
:func:`.core.cpu.mkl_dispatch.apply`, which must run before torch loads: import this package first.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from qwen25vl_embed_server.core.cpu import mkl_dispatch

# Before anything here loads torch: MKL then chooses its kernels by the CPU's features.
mkl_dispatch.apply()

if TYPE_CHECKING:
    from qwen25vl_embed_server.core.admission.limits import Limits
    from qwen25vl_embed_server.core.admission.request import EncodedRequest
    from qwen25vl_embed_server.core.model.extractor import Extractor
    from qwen25vl_embed_server.core.model.finishing import Extraction
    from qwen25vl_embed_server.core.model.loading import LoadedModel, LoadOptions, load_model
    from qwen25vl_embed_server.core.scheduling.pipeline import Pipeline, PipelineConfig
    from qwen25vl_embed_server.rpc.calls import ServiceConfig
    from qwen25vl_embed_server.rpc.harness import BackgroundServer, ServerProcess
    from qwen25vl_embed_server.rpc.server import ServerConfig, create_server, serve

_EXPORTS = {
    "EncodedRequest": "core.admission.request",
    "Extraction": "core.model.finishing",
    "Extractor": "core.model.extractor",
    "Limits": "core.admission.limits",
    "LoadOptions": "core.model.loading",
    "LoadedModel": "core.model.loading",
    "load_model": "core.model.loading",
    "Pipeline": "core.scheduling.pipeline",
    "PipelineConfig": "core.scheduling.pipeline",
    "ServiceConfig": "rpc.calls",
    "ServerConfig": "rpc.server",
    "create_server": "rpc.server",
    "serve": "rpc.server",
    "BackgroundServer": "rpc.harness",
    "ServerProcess": "rpc.harness",
}

__all__ = [
    "BackgroundServer",
    "EncodedRequest",
    "Extraction",
    "Extractor",
    "Limits",
    "LoadOptions",
    "LoadedModel",
    "Pipeline",
    "PipelineConfig",
    "ServerConfig",
    "ServerProcess",
    "ServiceConfig",
    "create_server",
    "load_model",
    "serve",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)
