"""Ray Serve: the same .proto service through Serve's gRPC proxy, on the CPU, the tiny model.

The app is deployed from examples/ray/serve-cpu.yaml (only the model path, ports and resources
changed), the way `qwen25vl-embed serve-ray --config` and `serve run` deploy it. The SDK, a raw
stub and the Node.js example talk to Serve's proxy and get the plain server's numbers.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml

from qwen25vl_embed import EmbeddingClient, EmbeddingError, Embeddings
from qwen25vl_embed.requests import build_request
from qwen25vl_embed.v1 import embed_pb2_grpc as pb_grpc
from qwen25vl_embed_server.cli import main
from qwen25vl_embed_server.core.defaults import DEFAULT_CHUNK_BYTES
from qwen25vl_embed_server.core.scheduling.pipeline import PipelineConfig
from qwen25vl_embed_server.ray.deploy import deploy, load_config
from qwen25vl_embed_server.ray.deployment import APP_NAME, SERVICER_FUNCTION, EmbedderSettings
from qwen25vl_embed_server.rpc.calls import ServiceConfig

from ..contract.test_node_client import NODE_EXAMPLE, run_node
from ..helpers import noise_image, png_bytes
from ..npm import npm_ci
from .sockets import is_loopback, ray_sockets

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "ray"
# Smaller than the plain server's 1 MiB, so that a 448x448 image's vision_tokens (256 KiB) is
# split across messages here: the numbers must still match.
CHUNK_BYTES = 64 << 10
OUTPUTS = ["vision_tokens", "projected_tokens", "lm_image_tokens", "lm_pooled_mean", "lm_last_token"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def serve_address(ray_cluster: None, tiny_model_path: Path) -> Iterator[str]:
    from ray import serve

    raw = yaml.safe_load((EXAMPLES / "serve-cpu.yaml").read_text())
    application = raw["applications"][0]
    application["args"].update(model=str(tiny_model_path), dtype="float32", chunk_bytes=CHUNK_BYTES)
    # No CPU reserved: the Ray Data tests' actors share this 2-CPU Ray instance.
    application["deployments"][0]["ray_actor_options"] = {"num_cpus": 0}
    port = _free_port()
    raw["grpc_options"]["port"] = port
    raw["http_options"]["port"] = _free_port()
    deploy(load_config(raw), timeout_s=300)
    yield f"127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def ray_client(serve_address: str) -> Iterator[EmbeddingClient]:
    """The SDK as documented for Serve: the proxy's address, plus the application's name."""
    with EmbeddingClient(serve_address, timeout=120, metadata=[("application", APP_NAME)]) as sdk:
        yield sdk


def _images() -> list[bytes]:
    return [png_bytes(noise_image(w, h, seed=i)) for i, (w, h) in enumerate([(448, 448), (224, 112), (56, 84)])]


def _assert_same(got: Embeddings, expected: Embeddings) -> None:
    assert got.names == expected.names
    for name in expected.names:
        assert got[name].dtype == expected[name].dtype, name
        np.testing.assert_allclose(
            got[name].astype(np.float32), expected[name].astype(np.float32), rtol=1e-5, atol=1e-5, err_msg=name
        )
    np.testing.assert_array_equal(got.visual_token_lens, expected.visual_token_lens)
    np.testing.assert_array_equal(got.image_grid_thw, expected.image_grid_thw)
    np.testing.assert_array_equal(got.image_token_positions, expected.image_token_positions)
    assert got.sequence_length == expected.sequence_length


def test_sdk_gets_the_plain_servers_numbers(ray_client: EmbeddingClient, client: EmbeddingClient) -> None:
    images = _images()
    for image in images:
        _assert_same(ray_client.extract(image, outputs=OUTPUTS), client.extract(image, outputs=OUTPUTS))
    arguments: dict[str, Any] = {"prompt": "Compare the images.", "dtype": "bfloat16", "normalize": True}
    _assert_same(ray_client.extract(images[1:], **arguments), client.extract(images[1:], **arguments))


def test_responses_keep_the_chunking_contract(serve_address: str) -> None:
    request = build_request(_images()[0], outputs=["vision_tokens", "lm_last_token"], request_id="r1")
    with grpc.insecure_channel(serve_address) as channel:
        responses = list(pb_grpc.EmbeddingServiceStub(channel).Extract(request))
    assert len(responses) > 2, "vision_tokens should have been split"
    assert responses[0].HasField("metadata")
    assert not any(response.HasField("metadata") for response in responses[1:])
    assert [response.last for response in responses] == [False] * (len(responses) - 1) + [True]
    assert all(response.ByteSize() <= CHUNK_BYTES for response in responses)
    assert {response.request_id for response in responses} == {"r1"}


def test_errors_keep_their_status_codes(ray_client: EmbeddingClient) -> None:
    with pytest.raises(EmbeddingError) as corrupt:
        ray_client.extract(b"\x89PNG\r\n\x1a\n not really a png")
    assert corrupt.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 0" in corrupt.value.details
    with pytest.raises(EmbeddingError) as unknown:
        ray_client.extract(_images()[2], outputs=["no_such_output"])
    assert unknown.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "no_such_output" in unknown.value.details


def test_info_describes_the_replicas_model(ray_client: EmbeddingClient, client: EmbeddingClient) -> None:
    info, plain = ray_client.info(), client.info()
    assert info.chunk_bytes == CHUNK_BYTES
    assert dataclasses.replace(info, chunk_bytes=0) == dataclasses.replace(plain, chunk_bytes=0)


def test_extract_many_streams_through_the_proxy(ray_client: EmbeddingClient, client: EmbeddingClient) -> None:
    """ExtractBatch (bidirectional streaming) works through Serve's proxy, errors in place."""
    images: list[bytes] = [*_images(), b"not an image", *_images()[1:]]
    results = list(ray_client.extract_many(images, outputs=OUTPUTS, concurrency=3, errors="return"))
    assert [type(result).__name__ for result in results] == ["Embeddings"] * 3 + ["EmbeddingError"] + ["Embeddings"] * 2
    for image, result in zip(images, results, strict=True):
        if isinstance(result, Embeddings):
            _assert_same(result, client.extract(image, outputs=OUTPUTS))
    error = results[3]
    assert isinstance(error, EmbeddingError)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT


def test_node_consumer_talks_to_serve_unchanged(serve_address: str, client: EmbeddingClient, tmp_path: Path) -> None:
    npm_ci(NODE_EXAMPLE)
    image = tmp_path / "noise.png"
    image.write_bytes(_images()[0])
    outputs = ["vision_tokens", "lm_last_token", "visual_token_lens"]
    done = run_node("extract.js", str(image), "--server", serve_address, "--outputs", ",".join(outputs), "--json")
    assert done.returncode == 0, done.stderr
    node: dict[str, Any] = json.loads(done.stdout)
    expected = client.extract(image.read_bytes(), outputs=outputs)
    assert list(node["tensors"]) == outputs
    assert node["tensors"]["vision_tokens"]["parts"] > 1  # reassembled from several messages
    for name in outputs:
        got = np.asarray(node["tensors"][name]["values"], dtype=expected[name].dtype).reshape(expected[name].shape)
        np.testing.assert_allclose(got, expected[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_example_configs_expose_the_service_and_validate() -> None:
    for path in EXAMPLES.glob("*.yaml"):
        config = load_config(path)
        assert config.grpc_options.grpc_servicer_functions == [SERVICER_FUNCTION], path
        for application in config.applications:
            EmbedderSettings.model_validate(application.args)
    raw = yaml.safe_load((EXAMPLES / "serve.yaml").read_text())
    del raw["grpc_options"]["grpc_servicer_functions"]
    assert load_config(raw).grpc_options.grpc_servicer_functions == [SERVICER_FUNCTION]
    assert EmbedderSettings().chunk_bytes == DEFAULT_CHUNK_BYTES
    # Every service setting can be given to the replicas, but the calibration for deadline admission:
    # Ray's proxy forwards no deadline, so a replica never refuses by deadline (see EmbedderReplica).
    settings = {field.name for field in dataclasses.fields(ServiceConfig) if field.name != "pipeline"}
    settings |= {field.name for field in dataclasses.fields(PipelineConfig) if field.name != "limit_hints"}
    settings -= {"calibration_seconds"}
    assert "calibration_seconds" not in EmbedderSettings.model_fields
    assert settings <= set(EmbedderSettings.model_fields)
    with pytest.raises(ValueError, match="unknown_setting"):
        EmbedderSettings.model_validate({"unknown_setting": 1})


def test_serve_ray_refuses_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("applications: 3\n")
    assert main(["serve-ray", "--config", str(config)]) == 2
    assert "applications" in capsys.readouterr().err


# Ray 2.60 Serve binds two servers to "[::]" in code, with no setting (serve/_private/grpc_util.py:
# the gRPC proxy; replica.py: the replica's inter-deployment server). They listen on every
# interface; what reaches them here comes over loopback (checked below with every connection).
_SERVE_WILDCARD_LISTENERS = ("ray::ProxyActor", "ray::ServeRepli")


def test_every_socket_of_the_ray_processes_is_loopback(ray_client: EmbeddingClient) -> None:
    """GCS, raylet, workers, Serve's controller, proxy and replica: every connection runs between
    127.0.0.1 addresses and every listener is on 127.0.0.1 (init_ray's local mode), but for
    Serve's two wildcard listeners, checked on each socket while a call goes through."""
    assert ray_client.extract(png_bytes(noise_image(56, 56))).visual_token_lens.tolist() == [4]
    sockets = ray_sockets()
    assert {"gcs_server", "raylet", *_SERVE_WILDCARD_LISTENERS} <= {s.process for s in sockets}, sockets
    connections = [s for s in sockets if s.state != "LISTEN"]
    assert connections, sockets
    assert [s for s in connections if not (is_loopback(s.local) and is_loopback(s.peer))] == []
    listeners = [s for s in sockets if s.state == "LISTEN" and s.process not in _SERVE_WILDCARD_LISTENERS]
    assert [s for s in listeners if not is_loopback(s.local)] == []
