"""Shared fixtures: one tiny random-weight Qwen2.5-VL, a real server on 127.0.0.1, the real SDK."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qwen25vl_embed import EmbeddingClient
from qwen25vl_embed_server.core.extractor import Extractor
from qwen25vl_embed_server.core.loading import LoadedModel, LoadOptions, load_model
from qwen25vl_embed_server.core.tiny_model import build_tiny_model
from qwen25vl_embed_server.rpc.harness import BackgroundServer


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
def server(extractor: Extractor) -> Iterator[BackgroundServer]:
    with BackgroundServer(extractor) as running:
        yield running


@pytest.fixture(scope="session")
def client(server: BackgroundServer) -> Iterator[EmbeddingClient]:
    """The SDK client with gRPC's default message limits (4 MiB receive)."""
    with EmbeddingClient(server.address) as sdk:
        yield sdk


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray instance (2 CPUs, no dashboard) for the Ray Serve and Ray Data tests."""
    import ray

    # Loopback only: Ray's processes talk to each other over 127.0.0.1, not the machine's address.
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()
