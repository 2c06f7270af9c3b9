"""Refusals, each with its status and in its peer's JSON shape: 401 (tokens, TLS beside), 400
(malformed bodies, bad data URLs, unknown values: none reaches the model), 413 (over a limit),
429 with Retry-After (the pipeline at capacity), 503 while the model loads, 404."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from qwen25vl_embed.channels import TLSConfig
from qwen25vl_embed_server.core.admission.limits import Limits
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.scheduling.batcher import BatchingConfig
from qwen25vl_embed_server.http.config import HTTPConfig
from qwen25vl_embed_server.http.serving import HTTPServer
from qwen25vl_embed_server.rpc.auth import AuthConfig
from qwen25vl_embed_server.rpc.server import create_server
from qwen25vl_embed_server.rpc.tls import TLSServerConfig

from ..helpers import server_config
from ..rpc.test_faults import ModelProbe
from ..rpc.test_security import Authority
from .conftest import TIMEOUT, Pair, data_url, image_message, image_png

TOKEN = "http-token-0123"
HOLD = (196, 56)  # held in the model until the test releases it


def openai_error(reply: httpx.Response, status: int) -> str:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    message: str = error["message"]
    return message


@pytest.fixture(scope="module")
def http(pair: Pair) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pair.url, timeout=TIMEOUT) as client:
        yield client


def test_malformed_bodies_are_400_and_never_reach_the_model(
    http: httpx.Client, pair: Pair, extractor: Extractor
) -> None:
    png = image_png(seed=1)
    cases: list[tuple[Any, str]] = [
        (b"{not json", "JSON"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"input": "x", "dimension": 3}, "dimension: Extra inputs are not permitted"),
        ({"input": [1, 2, 3]}, "input"),
        ({"input": ""}, "input"),
        ({"input": []}, "empty list"),
        ({"input": "x", "messages": image_message(png)}, "exactly one of input"),
        ({"messages": image_message(b"\x89PNG not really")}, "input 0: image 0"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}
                ]
            },
            "the server fetches nothing",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:text/plain;base64,eA=="}}],
                    }
                ]
            },
            "expected an image/* type",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "a"}, *image_message(png)[0]["content"]]}
                ]
            },
            "put the images first",
        ),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}, "one user message"),
        ({"input": "x <|image_pad|>"}, "reserved for images"),
    ]
    forwards: list[int] = []
    hook = extractor.loaded.model.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        for body, message in cases:
            if isinstance(body, bytes):
                reply = http.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
            else:
                reply = http.post("/v1/embeddings", json=body)
            assert message in openai_error(reply, 400), (body, reply.text)
    finally:
        hook.remove()
    assert forwards == []
    plain = http.post("/v1/embeddings", content=b'{"input": "x"}', headers={"content-type": "text/plain"})
    assert "Content-Type: application/json" in openai_error(plain, 400)
    headers = {"x-request-timeout": "soon"}
    assert "x-request-timeout" in openai_error(http.post("/v1/embeddings", json={"input": "x"}, headers=headers), 400)


def test_unknown_routes_and_methods_answer_in_the_openai_shape(http: httpx.Client) -> None:
    openai_error(http.get("/v1/nothing"), 404)
    openai_error(http.get("/v1/embeddings"), 405)


def test_over_a_limit_is_413(serving_pair: Any, extractor: Extractor, http: httpx.Client) -> None:
    nine = [f"text {k}" for k in range(9)]
    assert "max_inputs=8 (set with --http-max-inputs)" in openai_error(
        http.post("/v1/embeddings", json={"input": nine}), 413
    )
    limits = Limits(max_request_bytes=2048, max_images=1, max_prompt_tokens=16)
    with serving_pair(extractor, limits=limits) as small, httpx.Client(base_url=small.url, timeout=TIMEOUT) as client:
        big = {"input": "y" * 4000}
        assert "max_request_bytes=2048" in openai_error(client.post("/v1/embeddings", json=big), 413)

        def chunks() -> Iterator[bytes]:  # no Content-Length: the size shows only while reading
            yield b'{"input": "'
            for _ in range(10):
                yield b"z" * 500
            yield b'"}'

        chunked = client.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
        assert "is at least" in openai_error(chunked, 413)
        cohere = client.post("/v2/embed", json={"texts": ["w" * 3000]})
        assert cohere.status_code == 413
        assert "max_request_bytes" in cohere.json()["message"]
        long_text = client.post("/v1/embeddings", json={"input": "word " * 100})
        assert "max_prompt_tokens" in openai_error(long_text, 413)


def test_at_capacity_is_429_with_retry_after(serving_pair: Any, extractor: Extractor) -> None:
    batching = BatchingConfig(lanes=1, max_wait_ms=1)
    with (
        serving_pair(extractor, max_in_flight=1, batching=batching) as busy,
        httpx.Client(base_url=busy.url, timeout=TIMEOUT) as client,
        ThreadPoolExecutor(1) as pool,
        ModelProbe(extractor, hold=HOLD) as probe,
    ):
        held = image_png(seed=8, width=HOLD[0], height=HOLD[1])
        first = pool.submit(client.post, "/v1/embeddings", json={"messages": image_message(held)})
        assert probe.holding.wait(TIMEOUT)
        refused = client.post("/v1/embeddings", json={"input": "x"})
        assert "capacity" in openai_error(refused, 429)
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert int(refused.headers["retry-after"]) >= 1
        cohere = client.post("/v2/embed", json={"texts": ["x"]})
        assert cohere.status_code == 429
        assert int(cohere.headers["retry-after"]) >= 1
        assert "capacity" in cohere.json()["message"]
        probe.release()
        done = first.result(TIMEOUT)
        assert done.status_code == 200, done.text
        expected = busy.sdk.extract(held, outputs=["lm_last_token"], normalize=True)["lm_last_token"][0]
        np.testing.assert_array_equal(np.asarray(done.json()["data"][0]["embedding"], np.float32), expected)


def test_before_the_model_is_loaded_503_then_200(extractor: Extractor) -> None:
    async def scenario() -> None:
        config = server_config()
        http = HTTPServer.beside(config, HTTPConfig())
        running = await create_server(config, [http])
        try:
            async with httpx.AsyncClient(base_url=http.url, timeout=TIMEOUT) as client:
                health = await client.get("/health")
                assert "still loading" in openai_error(health, 503)
                refused = await client.post("/v1/embeddings", json={"input": "x"})
                assert "still loading" in openai_error(refused, 503)
                assert int(refused.headers["retry-after"]) >= 1
                cohere = await client.post("/v2/embed", json={"texts": ["x"]})
                assert cohere.status_code == 503
                assert "still loading" in cohere.json()["message"]
                await running.mark_serving(extractor)
                assert (await client.get("/health")).json() == {"status": "ok"}
                served = await client.post("/v1/embeddings", json={"input": "x"})
                assert served.status_code == 200
        finally:
            await running.stop(0)

    asyncio.run(scenario())


def test_tokens_and_tls_are_the_grpc_ports(serving_pair: Any, extractor: Extractor, tmp_path: Any) -> None:
    authority = Authority.create("test CA")
    cert, key = authority.issue("embedding server", server=True)
    tls = TLSServerConfig(cert_chain=cert, private_key=key)
    client = {"tls": TLSConfig(ca_cert=authority.pem), "token": TOKEN}
    verify = ssl.create_default_context(cadata=authority.pem.decode())
    with (
        serving_pair(extractor, client=client, tls=tls, auth=AuthConfig((TOKEN, "other-token-99"))) as secure,
        httpx.Client(base_url=secure.url, timeout=TIMEOUT, verify=verify) as http,
    ):
        assert secure.url.startswith("https://127.0.0.1:")
        for headers in ({}, {"authorization": "Bearer wrong-token"}, {"authorization": TOKEN}):
            reply = http.post("/v1/embeddings", json={"input": "x"}, headers=headers)
            openai_error(reply, 401)
            assert reply.headers["www-authenticate"] == "Bearer"
        cohere = http.post("/v2/embed", json={"texts": ["x"]})
        assert cohere.status_code == 401
        assert "missing credentials" in cohere.json()["message"]
        openai_error(http.get("/v1/models"), 401)
        assert http.get("/health").status_code == 200  # probes need no token
        with pytest.raises(httpx.TransportError):  # plain HTTP gets no answer from the TLS port
            httpx.get(secure.url.replace("https", "http") + "/health", timeout=TIMEOUT)

        with (
            openai.DefaultHttpxClient(verify=verify, timeout=TIMEOUT) as transport,
            openai.OpenAI(base_url=f"{secure.url}/v1", api_key=TOKEN, http_client=transport) as sdk,
        ):
            response = sdk.embeddings.create(model="", input="through TLS")
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=f"{secure.url}/v1", api_key="nope", http_client=transport).models.list()
        data = image_png(seed=6)
        cohere = http.post("/v2/embed", json={"images": [data_url(data)]}, headers={"authorization": f"Bearer {TOKEN}"})
        assert cohere.status_code == 200, cohere.text
        text = secure.sdk.extract(
            None, prompt="through TLS", prompt_format="raw", outputs=["lm_last_token"], normalize=True
        )
        image = secure.sdk.extract(data, outputs=["lm_last_token"], normalize=True)
    np.testing.assert_array_equal(np.asarray(response.data[0].embedding, np.float32), text["lm_last_token"][0])
    np.testing.assert_array_equal(
        np.asarray(cohere.json()["embeddings"]["float"][0], np.float32), image["lm_last_token"][0]
    )
