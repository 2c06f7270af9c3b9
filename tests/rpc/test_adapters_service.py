"""Several retrieval adapters on one base over gRPC: a real server on 127.0.0.1 serving the tiny base
with a ColQwen2.5 and a BiQwen2.5 adapter, against servers each loaded with one adapter alone, the
real SDK; mixed-adapter traffic at once; the refusals a caller sees.

Each adapter's vectors equal its own server's within 1e-5 relative in fp32 (the shared base keeps
the LoRA unmerged, the single-adapter server merges it: see ``tests/core/test_adapters.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import grpc
import numpy as np
import pytest

from qwen25vl_embed import EmbeddingClient, EmbeddingError, Embeddings, ExtractOptions
from qwen25vl_embed_server.core.fixtures.tiny_adapters import TinyAdapters, build_tiny_adapters
from qwen25vl_embed_server.core.model.loading import LoadOptions
from qwen25vl_embed_server.core.retrieval.adapter_spec import AdapterSpec
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import adapter_servers, assert_batched_close, noise_image, png_bytes

IMAGES = [png_bytes(noise_image(140, 112, seed=31)), png_bytes(noise_image(196, 224, seed=32))]
TEXTS = ["where is the cat", "quarterly revenue", "a map of the city"]
ADAPTERS = ("colqwen", "biqwen")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyAdapters:
    return build_tiny_adapters(tmp_path_factory.mktemp("adapters-rpc"))


@pytest.fixture(scope="module")
def servers(tiny: TinyAdapters) -> Iterator[dict[str, BackgroundServer]]:
    """``shared``: the base with both adapters; each adapter's name: a server of that adapter alone."""
    with adapter_servers(tiny, alone=tiny.adapters) as running:
        yield running


@pytest.fixture(scope="module")
def clients(servers: dict[str, BackgroundServer]) -> Iterator[dict[str, EmbeddingClient]]:
    with ExitStack() as stack:
        yield {name: stack.enter_context(EmbeddingClient(server.address)) for name, server in servers.items()}


def test_info_lists_the_adapters(clients: dict[str, EmbeddingClient]) -> None:
    info = clients["shared"].info()
    assert info.recipe is None
    listed = [(a.name, a.recipe.name, a.recipe.output, a.recipe.dimension) for a in info.adapters]
    assert listed == [("colqwen", "colqwen2.5", "multi_vector", 128), ("biqwen", "biqwen2.5", "single_vector", 64)]
    assert clients["colqwen"].info().adapters == ()


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_each_adapter_equals_its_own_server(clients: dict[str, EmbeddingClient], adapter: str) -> None:
    shared, alone = clients["shared"], clients[adapter]
    pairs = [
        (shared.embed_images(IMAGES, adapter=adapter), alone.embed_images(IMAGES)),
        (shared.embed_queries(TEXTS, adapter=adapter), alone.embed_queries(TEXTS)),
        (shared.embed_queries(TEXTS, 16, options=ExtractOptions(adapter=adapter)), alone.embed_queries(TEXTS, 16)),
    ]
    for ours, theirs in pairs:
        for got, want in zip(ours, theirs, strict=True):
            assert got.shape == want.shape
            assert_batched_close(got, want, adapter)
    result = shared.extract(IMAGES[0], outputs=["lm_last_token"], adapter=adapter)
    reference = alone.extract(IMAGES[0], outputs=["lm_last_token"])
    assert_batched_close(result["lm_last_token"], reference["lm_last_token"], "raw states with the adapter")


def test_mixed_adapter_traffic_at_once(clients: dict[str, EmbeddingClient]) -> None:
    """Callers of both adapters and of the base at the same time: the server batches them
    together; each answer equals its own server's."""
    shared = clients["shared"]
    expected = {
        adapter: [*clients[adapter].embed_images(IMAGES), *clients[adapter].embed_queries(TEXTS)]
        for adapter in ADAPTERS
    }
    base = [clients["shared"].extract(image, outputs=["lm_pooled_mean"])["lm_pooled_mean"] for image in IMAGES]

    def vectors(adapter: str) -> list[np.ndarray]:
        return [*shared.embed_images(IMAGES, adapter=adapter), *shared.embed_queries(TEXTS, adapter=adapter)]

    def raw(index: int) -> np.ndarray:
        return shared.extract(IMAGES[index], outputs=["lm_pooled_mean"])["lm_pooled_mean"]

    with ThreadPoolExecutor(max_workers=6) as pool:
        adapted = {adapter: [pool.submit(vectors, adapter) for _ in range(3)] for adapter in ADAPTERS}
        plain = [pool.submit(raw, index % 2) for index in range(4)]
        for adapter, futures in adapted.items():
            for future in futures:
                for got, want in zip(future.result(), expected[adapter], strict=True):
                    assert_batched_close(got, want, adapter)
        for index, done in enumerate(plain):
            assert_batched_close(done.result(), base[index % 2], "base")


def test_extract_many_carries_the_adapter(clients: dict[str, EmbeddingClient]) -> None:
    many = list(clients["shared"].extract_many(IMAGES, prompt_format="document", adapter="biqwen"))
    for result, want in zip(many, clients["biqwen"].embed_images(IMAGES), strict=True):
        assert isinstance(result, Embeddings)
        assert_batched_close(result["single_vector"], want, "extract_many")


def test_an_unknown_adapter_is_invalid_argument(clients: dict[str, EmbeddingClient]) -> None:
    with pytest.raises(EmbeddingError) as caught:
        clients["shared"].embed_queries(["q"], adapter="colpali")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown adapter 'colpali'" in str(caught.value)
    assert "colqwen, biqwen" in str(caught.value)
    with pytest.raises(EmbeddingError) as caught:
        clients["colqwen"].embed_queries(["q"], adapter="biqwen")  # a server of one checkpoint has none
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "serve --adapter NAME=PATH" in str(caught.value)


def test_a_recipe_output_of_the_raw_base_is_invalid_argument(clients: dict[str, EmbeddingClient]) -> None:
    with pytest.raises(EmbeddingError) as caught:
        clients["shared"].extract(IMAGES[0], outputs=["multi_vector"])
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs an adapter" in str(caught.value)
    with pytest.raises(EmbeddingError) as caught:
        clients["shared"].embed_queries(["q"])
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs a retrieval recipe" in str(caught.value)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--adapter", "colqwen"], "--adapter colqwen: 'colqwen' is not NAME=PATH"),
        (["--adapter", "x=/no/such/folder"], "--adapter x=/no/such/folder: /no/such/folder is not a folder"),
        (["--adapter", "a b=/tmp"], "--adapter a b=/tmp: adapter name 'a b'"),
        (["--adapter", "a={biqwen}", "--adapter", "a={colqwen}"], "the name 'a' is given twice"),
        (["--adapter", "a={biqwen}", "--recipe", "biqwen2.5"], "--recipe biqwen2.5 serves a model alone"),
    ],
)
def test_serve_refuses_bad_adapter_flags_at_start(
    tiny: TinyAdapters, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    from qwen25vl_embed_server.cli.app import main

    paths = {name: str(path) for name, path in tiny.adapters.items()}
    given = [flag.format(**paths) for flag in flags]
    assert main(["serve", "--model", str(tiny.base), "--port", "0", *given]) == 2
    assert message in capsys.readouterr().err


def test_extract_command_sends_the_adapter(
    clients: dict[str, EmbeddingClient], servers: dict[str, BackgroundServer], tiny: TinyAdapters, tmp_path: Path
) -> None:
    """``qwen25vl-embed extract --server ... --adapter biqwen``: the saved vector is biqwen's."""
    from qwen25vl_embed_server.cli.app import main

    image = tmp_path / "page.png"
    image.write_bytes(IMAGES[0])
    address = servers["shared"].address
    args = ["extract", str(image), "--server", address, "--outdir", str(tmp_path / "out"), "--flat"]
    assert main([*args, "--adapter", "biqwen", "--outputs", "single_vector"]) == 0
    saved = np.load(tmp_path / "out" / "page" / "single_vector.npy")
    # A retrieval adapter's images are documents (extract's --prompt-format auto).
    expected = clients["biqwen"].extract(IMAGES[0], prompt_format="document", outputs=["single_vector"])
    assert_batched_close(saved, expected["single_vector"], "extract --adapter")
    assert main([*args, "--adapter", f"biqwen={tiny.adapters['biqwen']}"]) == 2  # NAME=PATH is for in-process


def test_ray_serve_settings_carry_the_adapters(tiny: TinyAdapters) -> None:
    from qwen25vl_embed_server.ray.deployment import EmbedderSettings

    settings = EmbedderSettings(
        model=str(tiny.base), adapters={name: str(path) for name, path in tiny.adapters.items()}
    )
    assert settings.load_options().adapters == tuple(AdapterSpec.parse(flag) for flag in tiny.flags())
    with pytest.raises(ValueError, match=r"adapter name 'a b'"):
        EmbedderSettings(adapters={"a b": "/x"}).load_options()


def test_the_bulk_actor_runs_each_image_with_the_job_adapter(
    clients: dict[str, EmbeddingClient], tiny: TinyAdapters, tmp_path: Path
) -> None:
    import torch

    from qwen25vl_embed_server.ray.bulk_actor import BulkExtractionActor
    from qwen25vl_embed_server.ray.bulk_job import BulkJob

    paths = []
    for index, data in enumerate(IMAGES):
        paths.append(tmp_path / f"image{index}.png")
        paths[-1].write_bytes(data)
    load = LoadOptions(str(tiny.base), device="cpu", dtype="float32", adapters=(AdapterSpec.parse(tiny.flags()[1]),))
    job = BulkJob(
        source=str(tmp_path), output=tmp_path / "out", load=load, outputs=("single_vector",), adapter="biqwen"
    )
    before = torch.get_num_threads()
    try:  # the actor sets its process's torch threads (Ray gives it a process of its own)
        actor = BulkExtractionActor(job)
        table = actor({"path": np.array([str(path) for path in paths])})
    finally:
        torch.set_num_threads(before)
    assert table.column("error").to_pylist() == [None, None]
    for row, data in enumerate(IMAGES):
        expected = clients["biqwen"].extract(data, prompt_format="document", outputs=["single_vector"])["single_vector"]
        got = np.asarray(table.column("single_vector")[row].as_py(), np.float32).reshape(expected.shape)
        assert_batched_close(got, expected, f"bulk row {row}")
