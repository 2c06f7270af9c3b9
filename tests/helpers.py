"""Test inputs (deterministic images) and server settings."""

from __future__ import annotations

import io
import platform
import sys
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from qwen25vl_embed_server.core.admission.limits import Limits
from qwen25vl_embed_server.core.cpu import mkl_dispatch
from qwen25vl_embed_server.core.defaults import DEFAULT_CHUNK_BYTES, DEFAULT_STREAM_WINDOW
from qwen25vl_embed_server.core.scheduling.batcher import BatchingConfig
from qwen25vl_embed_server.core.scheduling.pipeline import PipelineConfig
from qwen25vl_embed_server.rpc.calls import ServiceConfig
from qwen25vl_embed_server.rpc.server import ServerConfig

if TYPE_CHECKING:
    from qwen25vl_embed_server.core.model.extractor import Extractor


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB noise image (every patch differs, so any reordering shows)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def server_config(
    *,
    batching: BatchingConfig | None = None,
    limits: Limits | None = None,
    max_in_flight: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    stream_window: int = DEFAULT_STREAM_WINDOW,
    **server: Any,
) -> ServerConfig:
    """A ServerConfig on a free loopback port; the service settings flattened into keywords, the
    others (``auth``, ``tls``, ``metrics_port``, ...) are ServerConfig's own."""
    pipeline = PipelineConfig(
        batching=batching or BatchingConfig(), limits=limits or Limits(), max_in_flight=max_in_flight
    )
    service = ServiceConfig(chunk_bytes=chunk_bytes, stream_window=stream_window, pipeline=pipeline)
    return ServerConfig(port=0, service=service, **server)


BATCHED_RTOL = 1e-5
"""What batching promises: each value within 1e-5 of the unbatched one, relative to the tensor's scale."""


def assert_batched_close(actual: np.ndarray, expected: np.ndarray, name: str = "") -> None:
    """``actual`` (possibly computed in a batch) equals the unbatched ``expected`` as promised:
    within :data:`BATCHED_RTOL` relative, where values near zero are compared at the tensor's
    scale (a batched kernel reorders sums: its error is relative to the terms, not to the result)."""
    wide, reference = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = float(np.abs(reference).max(initial=0.0))
    np.testing.assert_allclose(wide, reference, rtol=BATCHED_RTOL, atol=BATCHED_RTOL * scale, err_msg=name)


def applies_here() -> bool:
    """Whether MKL's dispatch by features applies on this machine (core/cpu/mkl_dispatch.py): the
    expectation its tests compute from the CPU, so that they run everywhere."""
    return sys.platform == "linux" and platform.machine() == "x86_64" and mkl_dispatch._cpu_vendor() != "GenuineIntel"


@contextmanager
def adapter_servers(tiny: Any, alone: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Servers on 127.0.0.1 (fp32, CPU) for a :class:`TinyAdapters`: ``"shared"``, its base with every
    adapter (``serve --adapter``); and each adapter named in ``alone``, a server of that adapter alone."""
    from qwen25vl_embed_server.rpc.harness import BackgroundServer

    models = {"shared": (tiny.base, *tiny.flags()), **{name: (tiny.adapters[name],) for name in alone}}
    with ExitStack() as stack:
        yield {
            name: stack.enter_context(BackgroundServer(load_extractor(*model), server_config()))
            for name, model in models.items()
        }


def load_extractor(model: Any, *adapters: str, **options: Any) -> Extractor:
    """An :class:`Extractor` of ``model`` (a folder) in fp32 on the CPU, with ``adapters`` (flags of
    ``serve --adapter NAME=PATH``) and other :class:`LoadOptions`."""
    from qwen25vl_embed_server.core.model.extractor import Extractor
    from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model
    from qwen25vl_embed_server.core.retrieval.adapter_spec import AdapterSpec

    specs = tuple(map(AdapterSpec.parse, adapters))
    return Extractor(
        load_model(LoadOptions(model=str(model), device="cpu", dtype="float32", adapters=specs, **options))
    )
