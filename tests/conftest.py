"""Shared fixtures: one tiny random-weight Qwen2.5-VL, a real server on 127.0.0.1, the real SDK."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qwen25vl_embed import EmbeddingClient
from qwen25vl_embed_server.core.fixtures.tiny_model import build_tiny_model
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.loading import LoadedModel, LoadOptions, load_model
from qwen25vl_embed_server.core.scheduling.batcher import BatchingConfig
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from .helpers import server_config


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly built checkpoint, so tests exercise the current builder."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def loaded(tiny_model_path: Path) -> LoadedModel:
    return load_model(LoadOptions(model=str(tiny_model_path), device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def extractor(loaded: LoadedModel) -> Extractor:
    return Extractor(loaded)


@pytest.fixture(scope="session")
def colqwen_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight ColQwen2.5 in the published layout; the adapter folder (base beside it)."""
    from qwen25vl_embed_server.core.fixtures.tiny_retrieval import build_tiny_retrieval

    return build_tiny_retrieval(tmp_path_factory.mktemp("colqwen"), "colqwen2.5")


@pytest.fixture(scope="session")
def colqwen(colqwen_adapter: Path) -> Extractor:
    """The ColQwen2.5 served (recipe detected, adapter merged), fp32 on the CPU."""
    return Extractor(load_model(LoadOptions(model=str(colqwen_adapter), device="cpu", dtype="float32")))


@pytest.fixture(scope="session")
def tiny_server(extractor: Extractor) -> Callable[..., BackgroundServer]:
    """The one way tests start a server of their own: a real gRPC server on 127.0.0.1, serving the
    tiny model, started on entry of ``with tiny_server(**settings) as server:`` and stopped on exit.
    ``settings`` are :func:`tests.helpers.server_config`'s keywords."""

    def start(**settings: Any) -> BackgroundServer:
        return BackgroundServer(extractor, server_config(**settings))

    return start


@pytest.fixture(scope="session")
def server(tiny_server: Callable[..., BackgroundServer]) -> Iterator[BackgroundServer]:
    """The shared server with default settings."""
    with tiny_server() as running:
        yield running


@pytest.fixture(scope="session")
def client(server: BackgroundServer) -> Iterator[EmbeddingClient]:
    """The SDK client with gRPC's default message limits (4 MiB receive)."""
    with EmbeddingClient(server.address) as sdk:
        yield sdk


@pytest.fixture(scope="session")
def full_width_server(tiny_server: Callable[..., BackgroundServer]) -> Iterator[BackgroundServer]:
    """A server with one model lane, so every run uses all of the model's threads, as a reference
    computed on the test's own thread does: bit-for-bit comparisons with transformers go through it.

    On the default two lanes a run beside another one (or beside a run still ending on the first
    lane) is narrow, on one thread, and kernels may sum in another order at another thread count
    (MKL's AVX2 kernels do): such a run equals the reference within float rounding, not bit for bit.
    """
    with tiny_server(batching=BatchingConfig(lanes=1)) as running:
        yield running


@pytest.fixture(scope="session")
def full_width_client(full_width_server: BackgroundServer) -> Iterator[EmbeddingClient]:
    """The SDK client of :func:`full_width_server`."""
    with EmbeddingClient(full_width_server.address) as sdk:
        yield sdk


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray instance (2 CPUs, no dashboard) for the Ray Serve and Ray Data tests."""
    import ray

    from qwen25vl_embed_server.ray.local import init_ray

    # Loopback only, as serve-ray and bulk start a local Ray: every Ray process talks over
    # 127.0.0.1, never the machine's address (tests/ray/test_ray_loopback.py checks each socket).
    init_ray(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
