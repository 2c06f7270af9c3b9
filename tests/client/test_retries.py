"""The clients' retries (gRPC's own, from the service config :class:`RetryPolicy` writes) against a
real gRPC server on 127.0.0.1 that refuses a call's first attempts, then passes it on to the real
tiny-model server and returns its answer.

Each refusal is counted where it happens, on the server, so the attempts a client made are known
exactly; the pause the server asked for (``grpc-retry-pushback-ms``) is checked from below only
(the time between two attempts is at least the pushback), never from above.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from qwen25vl_embed import AsyncEmbeddingClient, EmbeddingClient, EmbeddingError, Embeddings, RetryPolicy
from qwen25vl_embed.channels import create_channel
from qwen25vl_embed.retries import DEFAULT_RETRY, retry_options
from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed.v1 import embed_pb2_grpc
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import noise_image, png_bytes
from ..npm import npm_ci

NODE_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"
FAST = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
IMAGE = png_bytes(noise_image(56, 56, seed=5))
OUTPUTS = ["lm_pooled_mean"]


@dataclass
class Plan:
    """What the server does with the attempts of a method: refuse the first ``times`` with
    ``code`` (and pushback ``pushback`` ms when not None), or with ``after_first`` answer the
    first response and then fail."""

    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    times: int = 0
    pushback: str | None = None
    after_first: bool = False


@dataclass
class RefusingService(embed_pb2_grpc.EmbeddingServiceServicer):
    """EmbeddingService that refuses as its plan says, then forwards to ``upstream``."""

    upstream: embed_pb2_grpc.EmbeddingServiceStub
    plan: Plan = field(default_factory=Plan)
    attempts: dict[str, list[float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self, plan: Plan) -> None:
        with self.lock:
            self.plan = plan
            self.attempts = {}

    def count(self, method: str) -> int:
        with self.lock:
            return len(self.attempts.get(method, []))

    def gaps(self, method: str) -> list[float]:
        with self.lock:
            times = self.attempts.get(method, [])
            return [b - a for a, b in pairwise(times)]

    def _gate(self, method: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.attempts.setdefault(method, []).append(time.monotonic())
            attempt, plan = len(self.attempts[method]), self.plan
        if attempt <= plan.times and not plan.after_first:
            self._refuse(plan, attempt, context)

    @staticmethod
    def _refuse(plan: Plan, attempt: int, context: grpc.ServicerContext) -> None:
        if plan.pushback is not None:
            context.set_trailing_metadata((("grpc-retry-pushback-ms", plan.pushback),))
        context.abort(plan.code, f"refused attempt {attempt}")

    def Info(  # noqa: N802 - the RPC's name
        self, request: pb.InfoRequest, context: grpc.ServicerContext
    ) -> pb.InfoResponse:
        self._gate("Info", context)
        return self.upstream.Info(request)

    def Extract(  # noqa: N802 - the RPC's name
        self, request: pb.ImageRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.EmbeddingResponse]:
        self._gate("Extract", context)
        for index, response in enumerate(self.upstream.Extract(request)):
            yield response
            if index == 0 and self.plan.after_first and self.count("Extract") <= self.plan.times:
                self._refuse(self.plan, self.count("Extract"), context)

    def ExtractBatch(  # noqa: N802 - the RPC's name
        self, request_iterator: Iterator[pb.ImageRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.EmbeddingResponse]:
        self._gate("ExtractBatch", context)
        yield from self.upstream.ExtractBatch(request_iterator)


@pytest.fixture(scope="module")
def refusing(server: BackgroundServer) -> Iterator[tuple[RefusingService, str]]:
    upstream = grpc.insecure_channel(server.address, options=[("grpc.enable_retries", 0)])
    service = RefusingService(embed_pb2_grpc.EmbeddingServiceStub(upstream))
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    embed_pb2_grpc.add_EmbeddingServiceServicer_to_server(service, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        yield service, f"127.0.0.1:{port}"
    finally:
        grpc_server.stop(grace=None)
        upstream.close()


def pooled(result: Embeddings | EmbeddingError) -> np.ndarray:
    assert isinstance(result, Embeddings), result
    return result.tensors["lm_pooled_mean"]


@pytest.fixture(scope="module")
def expected(client: EmbeddingClient) -> np.ndarray:
    """The answer of the real server, asked directly."""
    return client.extract(IMAGE, outputs=OUTPUTS).tensors["lm_pooled_mean"]


def test_unavailable_is_retried_until_the_server_answers(
    refusing: tuple[RefusingService, str], expected: np.ndarray
) -> None:
    service, address = refusing
    service.reset(Plan(grpc.StatusCode.UNAVAILABLE, times=2))
    with EmbeddingClient(address, retry=FAST) as sdk:
        result = sdk.extract(IMAGE, outputs=OUTPUTS)
    assert service.count("Extract") == 3
    np.testing.assert_allclose(result.tensors["lm_pooled_mean"], expected, rtol=1e-5, atol=1e-6)


def test_the_default_policy_retries(refusing: tuple[RefusingService, str], expected: np.ndarray) -> None:
    service, address = refusing
    service.reset(Plan(grpc.StatusCode.UNAVAILABLE, times=1))
    with EmbeddingClient(address) as sdk:
        result = sdk.extract(IMAGE, outputs=OUTPUTS)
    assert service.count("Extract") == 2
    np.testing.assert_allclose(result.tensors["lm_pooled_mean"], expected, rtol=1e-5, atol=1e-6)


def test_resource_exhausted_waits_the_pushback_the_server_asks_for(
    refusing: tuple[RefusingService, str], expected: np.ndarray
) -> None:
    service, address = refusing
    service.reset(Plan(grpc.StatusCode.RESOURCE_EXHAUSTED, times=2, pushback="300"))
    with EmbeddingClient(address, retry=FAST) as sdk:  # its own backoff is at most 50 ms
        result = sdk.extract(IMAGE, outputs=OUTPUTS)
    assert service.count("Extract") == 3
    assert all(gap >= 0.3 * 0.9 for gap in service.gaps("Extract")), service.gaps("Extract")
    np.testing.assert_allclose(result.tensors["lm_pooled_mean"], expected, rtol=1e-5, atol=1e-6)


def test_resource_exhausted_without_pushback_is_retried_with_backoff(refusing: tuple[RefusingService, str]) -> None:
    service, address = refusing
    service.reset(Plan(grpc.StatusCode.RESOURCE_EXHAUSTED, times=2))
    with EmbeddingClient(address, retry=FAST) as sdk:
        sdk.extract(IMAGE, outputs=OUTPUTS)
    assert service.count("Extract") == 3


@pytest.mark.parametrize("pushback", ["-1", "later"])
def test_pushback_that_is_not_a_delay_stops_the_retries(refusing: tuple[RefusingService, str], pushback: str) -> None:
    service, address = refusing
    service.reset(Plan(grpc.StatusCode.RESOURCE_EXHAUSTED, times=5, pushback=pushback))
    with EmbeddingClient(address, retry=FAST) as sdk, pytest.raises(EmbeddingError) as raised:
        sdk.extract(IMAGE, outputs=OUTPUTS)
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert service.count("Extract") == 1


def test_attempts_are_bounded(refusing: tuple[RefusingService, str]) -> None:
    service, address = refusing
    service.reset(Plan(grpc.StatusCode.UNAVAILABLE, times=100))
    with EmbeddingClient(address, retry=FAST) as sdk, pytest.raises(EmbeddingError) as raised:
        sdk.extract(IMAGE, outputs=OUTPUTS)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert "refused attempt 3" in raised.value.details
    assert service.count("Extract") == 3


@pytest.mark.parametrize(
    ("retry", "code"),
    [
        (None, grpc.StatusCode.UNAVAILABLE),  # retries off
        (FAST, grpc.StatusCode.INVALID_ARGUMENT),  # not a code the policy retries
        (
            RetryPolicy(max_attempts=3, initial_backoff=0.01, status_codes=(grpc.StatusCode.UNAVAILABLE,)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
    ],
)
def test_no_retry(refusing: tuple[RefusingService, str], retry: RetryPolicy | None, code: grpc.StatusCode) -> None:
    service, address = refusing
    service.reset(Plan(code, times=1))
    with EmbeddingClient(address, retry=retry) as sdk, pytest.raises(EmbeddingError) as raised:
        sdk.extract(IMAGE, outputs=OUTPUTS)
    assert raised.value.code == code
    assert service.count("Extract") == 1


def test_a_stream_that_has_begun_is_not_retried(refusing: tuple[RefusingService, str]) -> None:
    service, address = refusing
    service.reset(Plan(grpc.StatusCode.UNAVAILABLE, times=1, after_first=True))
    with EmbeddingClient(address, retry=FAST) as sdk, pytest.raises(EmbeddingError) as raised:
        sdk.extract(IMAGE, outputs=["projected_tokens"], dtype="float32")
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert service.count("Extract") == 1


def test_requests_over_the_retry_buffer_are_sent_once(refusing: tuple[RefusingService, str]) -> None:
    """A request larger than ``buffer_bytes`` is not kept to be resent: one attempt. With the
    default buffer (8 MiB) the same request is retried."""
    large = png_bytes(noise_image(224, 224, seed=6))
    assert len(large) > 100_000
    service, address = refusing
    service.reset(Plan(grpc.StatusCode.UNAVAILABLE, times=1))
    small_buffer = RetryPolicy(max_attempts=3, initial_backoff=0.01, buffer_bytes=64 * 1024)
    with EmbeddingClient(address, retry=small_buffer) as sdk, pytest.raises(EmbeddingError):
        sdk.extract(large, outputs=OUTPUTS)
    assert service.count("Extract") == 1
    service.reset(Plan(grpc.StatusCode.UNAVAILABLE, times=1))
    with EmbeddingClient(address, retry=FAST) as sdk:
        sdk.extract(large, outputs=OUTPUTS)
    assert service.count("Extract") == 2


def test_extract_many_stream_is_retried_before_its_first_answer(
    refusing: tuple[RefusingService, str], client: EmbeddingClient
) -> None:
    images = [png_bytes(noise_image(56 + 28 * (i % 3), 56, seed=20 + i)) for i in range(5)]
    direct = [pooled(r) for r in client.extract_many(images, outputs=OUTPUTS)]
    service, address = refusing
    service.reset(Plan(grpc.StatusCode.RESOURCE_EXHAUSTED, times=2, pushback="100"))
    with EmbeddingClient(address, retry=FAST) as sdk:
        results = [pooled(r) for r in sdk.extract_many(images, outputs=OUTPUTS)]
    assert service.count("ExtractBatch") == 3
    for got, want in zip(results, direct, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_asyncio_client_retries_too(refusing: tuple[RefusingService, str], expected: np.ndarray) -> None:
    service, address = refusing

    async def scenario(retry: RetryPolicy | None) -> Any:
        async with AsyncEmbeddingClient(address, retry=retry) as sdk:
            return await sdk.extract(IMAGE, outputs=OUTPUTS)

    service.reset(Plan(grpc.StatusCode.RESOURCE_EXHAUSTED, times=2, pushback="200"))
    result = asyncio.run(scenario(FAST))
    assert service.count("Extract") == 3
    assert all(gap >= 0.2 * 0.9 for gap in service.gaps("Extract")), service.gaps("Extract")
    np.testing.assert_allclose(result.tensors["lm_pooled_mean"], expected, rtol=1e-5, atol=1e-6)

    service.reset(Plan(grpc.StatusCode.UNAVAILABLE, times=1))
    with pytest.raises(EmbeddingError):
        asyncio.run(scenario(None))
    assert service.count("Extract") == 1


def test_the_service_config_names_the_service_and_the_policy() -> None:
    options = dict(retry_options([], DEFAULT_RETRY))
    assert options["grpc.enable_retries"] == 1
    assert options["grpc.per_rpc_retry_buffer_size"] == 8 * 1024 * 1024
    config = json.loads(options["grpc.service_config"])
    assert config == {
        "methodConfig": [
            {
                "name": [
                    {"service": "qwen25vl_embed.v1.EmbeddingService", "method": "Extract"},
                    {"service": "qwen25vl_embed.v1.EmbeddingService", "method": "ExtractBatch"},
                ],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "5s",
                    "backoffMultiplier": 2.0,
                    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
                },
            }
        ]
    }
    service = pb.DESCRIPTOR.services_by_name["EmbeddingService"]
    assert service.full_name == "qwen25vl_embed.v1.EmbeddingService"
    assert {"Extract", "ExtractBatch"} <= set(service.methods_by_name)
    # A service config of the caller's gets the policy unless it has method configs of its own.
    balancing: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    merged = dict(retry_options([("grpc.service_config", json.dumps(balancing))], DEFAULT_RETRY))
    assert json.loads(merged["grpc.service_config"]) == balancing | DEFAULT_RETRY.service_config()
    own = ("grpc.service_config", json.dumps({"methodConfig": []}))
    assert [name for name, _ in retry_options([own], DEFAULT_RETRY)].count("grpc.service_config") == 1
    assert own in retry_options([own], DEFAULT_RETRY)
    with pytest.raises(ValueError, match="must be a JSON object"):
        retry_options([("grpc.service_config", "[]")], DEFAULT_RETRY)
    # None turns retries off.
    assert retry_options([], None) == [("grpc.enable_retries", 0)]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_attempts": 1}, "max_attempts must be 2 to 5"),
        ({"max_attempts": 6}, "max_attempts must be 2 to 5"),
        ({"initial_backoff": 0}, "initial_backoff must be positive"),
        ({"initial_backoff": 2.0, "max_backoff": 1.0}, "max_backoff"),
        ({"backoff_multiplier": 0}, "backoff_multiplier must be positive"),
        ({"status_codes": ()}, "status_codes"),
        ({"status_codes": ("UNAVAILABLE",)}, "status_codes"),
        ({"status_codes": (grpc.StatusCode.OK,)}, "cannot include OK"),
        ({"buffer_bytes": -1}, "buffer_bytes"),
    ],
)
def test_bad_policies_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**settings)


def test_channels_of_create_channel_retry_by_default(refusing: tuple[RefusingService, str]) -> None:
    """A channel of one's own (``channel=``) made by ``create_channel`` retries as the clients do."""
    service, address = refusing
    service.reset(Plan(grpc.StatusCode.UNAVAILABLE, times=1))
    with create_channel(address) as channel:
        EmbeddingClient(address, channel=channel).extract(IMAGE, outputs=OUTPUTS)
    assert service.count("Extract") == 2
    service.reset(Plan(grpc.StatusCode.UNAVAILABLE, times=1))
    with create_channel(address, retry=None) as channel, pytest.raises(EmbeddingError):
        EmbeddingClient(address, channel=channel).extract(IMAGE, outputs=OUTPUTS)
    assert service.count("Extract") == 1


def test_retry_configures_the_channel_created_here() -> None:
    channel = grpc.insecure_channel("127.0.0.1:1")
    try:
        with pytest.raises(ValueError, match="not with channel="):
            EmbeddingClient("127.0.0.1:1", channel=channel, retry=None)
        EmbeddingClient("127.0.0.1:1", channel=channel).close()
    finally:
        channel.close()


def test_the_node_example_retries_with_the_same_service_config(
    refusing: tuple[RefusingService, str], tmp_path: Path
) -> None:
    """examples/node's service config is the SDK's default policy, and grpc-js follows it: a
    refusal with pushback is retried after the pause, then the answer is printed."""
    node_example = NODE_EXAMPLE
    assert json.loads((node_example / "service_config.json").read_text()) == DEFAULT_RETRY.service_config()
    npm_ci(node_example)
    image = tmp_path / "noise.png"
    image.write_bytes(IMAGE)
    service, address = refusing
    service.reset(Plan(grpc.StatusCode.RESOURCE_EXHAUSTED, times=2, pushback="150"))
    done = subprocess.run(
        ["node", "extract.js", str(image), "--server", address, "--outputs", ",".join(OUTPUTS), "--json"],
        cwd=node_example,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert service.count("Extract") == 3
    assert all(gap >= 0.15 * 0.9 for gap in service.gaps("Extract")), service.gaps("Extract")
    assert set(json.loads(done.stdout)["tensors"]) >= set(OUTPUTS)
