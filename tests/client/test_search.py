"""The SDK's search side: embed_queries / embed_images over a real server serving ColQwen2.5,
MaxSim and token pooling against colpali-engine's own implementations."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from colpali_engine.compression.token_pooling import HierarchicalTokenPooler
from colpali_engine.models import ColQwen2_5_Processor

from qwen25vl_embed import AsyncEmbeddingClient, EmbeddingClient, maxsim, pool_tokens, storage_bytes
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import assert_batched_close, noise_image, png_bytes, server_config

QUERIES = ["where is the cat", "quarterly revenue", "a"]
IMAGES = [png_bytes(noise_image(224, 224, seed=s)) for s in range(3)]


@pytest.fixture(scope="module")
def colqwen_server(colqwen: Extractor) -> Iterator[BackgroundServer]:
    with BackgroundServer(colqwen, server_config()) as running:
        yield running


@pytest.fixture(scope="module")
def search_client(colqwen_server: BackgroundServer) -> Iterator[EmbeddingClient]:
    with EmbeddingClient(colqwen_server.address) as sdk:
        yield sdk


def test_info_reports_the_recipe(search_client: EmbeddingClient) -> None:
    recipe = search_client.info().recipe
    assert recipe is not None
    assert (recipe.name, recipe.output, recipe.dimension) == ("colqwen2.5", "multi_vector", 128)
    assert recipe.query_suffix == "<|endoftext|>" * 10


def test_embed_queries_and_images_equal_the_core_alone(search_client: EmbeddingClient, colqwen: Extractor) -> None:
    queries = search_client.embed_queries(QUERIES)
    documents = search_client.embed_images(IMAGES)
    plan_text = colqwen.plan([], has_images=False)
    for text, got in zip(QUERIES, queries, strict=True):
        alone = colqwen.run([colqwen.prepare([], text, plan_text, prompt_format="query")])[0]
        assert_batched_close(got, alone.tensors["multi_vector"], text)
    alone_doc = colqwen.extract([noise_image(224, 224, seed=0)], "", colqwen.plan([]), prompt_format="document")
    assert_batched_close(documents[0], alone_doc.tensors["multi_vector"])
    assert all(d.shape[1] == 128 for d in documents)


def test_embed_with_dimensions_and_the_aio_client(colqwen_server: BackgroundServer) -> None:
    async def run() -> tuple[list[np.ndarray], list[np.ndarray]]:
        async with AsyncEmbeddingClient(colqwen_server.address) as client:
            return await client.embed_queries(QUERIES[:2], dimensions=32), await client.embed_images(IMAGES[:1])

    queries, documents = asyncio.run(run())
    assert [q.shape[1] for q in queries] == [32, 32]
    np.testing.assert_allclose(np.linalg.norm(queries[0], axis=-1), 1.0, rtol=1e-6)
    assert documents[0].shape[1] == 128


def test_maxsim_equals_colpali_scoring(search_client: EmbeddingClient) -> None:
    queries = search_client.embed_queries(QUERIES)
    documents = search_client.embed_images(IMAGES)
    processor = ColQwen2_5_Processor.__new__(ColQwen2_5_Processor)  # scoring needs no tokenizer
    expected = processor.score_multi_vector([torch.tensor(q) for q in queries], [torch.tensor(d) for d in documents])
    ours = np.stack([maxsim(q, documents) for q in queries])
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-5)


def test_maxsim_ignores_padding_of_shorter_documents() -> None:
    query = np.eye(2, 4, dtype=np.float32)
    short, long = np.array([[-1, 0, 0, 0]], np.float32), np.array([[-1, 0, 0, 0], [0, 0, 1, 0]], np.float32)
    np.testing.assert_array_equal(maxsim(query, [short, long]), [-1.0, 0.0])


def test_token_pooling_equals_colpali_and_shrinks_storage(search_client: EmbeddingClient) -> None:
    documents = search_client.embed_images(IMAGES[:2])
    pooled = [pool_tokens(d, pool_factor=3) for d in documents]
    tensors = [torch.tensor(d) for d in documents]  # copies: the SDK's arrays are read-only
    expected = HierarchicalTokenPooler().pool_embeddings(tensors, pool_factor=3)
    for ours, reference in zip(pooled, expected, strict=True):
        np.testing.assert_allclose(ours, reference.numpy(), rtol=1e-5, atol=1e-6)
    assert storage_bytes(pooled) <= storage_bytes(documents) / 2


def test_int8_and_binary_wire_forms(search_client: EmbeddingClient) -> None:
    full = search_client.embed_queries(QUERIES[:1], dimensions=64)[0]
    as_int8 = search_client.embed_queries(QUERIES[:1], dimensions=64, encoding="int8")[0]
    as_bits = search_client.embed_queries(QUERIES[:1], dimensions=64, encoding="binary")[0]
    assert (as_int8.dtype, as_int8.shape) == (np.dtype(np.int8), full.shape)
    np.testing.assert_array_equal(as_int8, np.clip(np.rint(full * 127), -127, 127).astype(np.int8))
    assert np.abs(as_int8 / 127.0 - full).max() <= 0.5 / 127 + 1e-6
    assert (as_bits.dtype, as_bits.shape) == (np.dtype(np.uint8), (full.shape[0], 8))
    np.testing.assert_array_equal(np.unpackbits(as_bits, axis=-1).astype(bool), full > 0)
    assert storage_bytes([as_bits]) * 32 == storage_bytes([full])
