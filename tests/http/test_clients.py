"""``qwen25vl-embed serve --http-port`` as a user starts it (tokens from the environment), called
with curl and from Node.js with fetch alone; the vectors equal the gRPC service's."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qwen25vl_embed import EmbeddingClient
from qwen25vl_embed_server.rpc.harness import ServerProcess

from .conftest import TIMEOUT, data_url, image_png

TOKEN = "cli-http-token-42"
FETCH_CLIENT = Path(__file__).with_name("fetch_client.mjs")


class Lines:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> None:
        self.text += text


@dataclass
class Served:
    url: str
    sdk: EmbeddingClient


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    log = Lines()
    arguments = ["--model", "tiny-random", "--model-lanes", "1", "--http-port", "0", "--served-model-name", "tiny"]
    arguments += ["--auth-token-env", "HTTP_TEST_TOKEN"]
    with ServerProcess(arguments, echo=log, env={"HTTP_TEST_TOKEN": TOKEN}) as server:
        match = re.search(r"HTTP API at (http://\S+)", log.text)
        assert match is not None, log.text
        with EmbeddingClient(server.address, token=TOKEN) as sdk:
            yield Served(match.group(1), sdk)


def grpc_vector(sdk: EmbeddingClient, image: bytes | None = None, text: str | None = None) -> np.ndarray:
    if image is None:
        result = sdk.extract(None, prompt=text, prompt_format="raw", outputs=["lm_last_token"], normalize=True)
    else:
        result = sdk.extract(image, outputs=["lm_last_token"], normalize=True)
    return np.asarray(result["lm_last_token"][0])


def curl(url: str, body: dict[str, Any] | None, token: str | None) -> tuple[int, Any]:
    command = ["curl", "-sS", "--max-time", str(TIMEOUT), "-o", "-", "-w", "\n%{http_code}", url]
    if token is not None:
        command += ["-H", f"Authorization: Bearer {token}"]
    if body is not None:
        command += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
    done = subprocess.run(
        command, input=json.dumps(body or {}), capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    payload, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(payload)


def test_curl(served: Served) -> None:
    assert shutil.which("curl") is not None, "curl is needed (the Makefile installs it)"
    image = image_png(seed=11)
    status, body = curl(f"{served.url}/v1/embeddings", {"model": "tiny", "input": "hello from curl"}, TOKEN)
    assert status == 200, body
    np.testing.assert_array_equal(
        np.asarray(body["data"][0]["embedding"], np.float32), grpc_vector(served.sdk, text="hello from curl")
    )
    status, body = curl(f"{served.url}/v2/embed", {"images": [data_url(image)], "input_type": "image"}, TOKEN)
    assert status == 200, body
    np.testing.assert_array_equal(
        np.asarray(body["embeddings"]["float"][0], np.float32), grpc_vector(served.sdk, image)
    )
    status, body = curl(f"{served.url}/v1/embeddings", {"input": "x"}, None)
    assert status == 401
    assert "missing credentials" in body["error"]["message"]
    status, body = curl(f"{served.url}/v1/models", None, TOKEN)
    assert status == 200
    assert [model["id"] for model in body["data"]] == ["tiny"]


def test_node_fetch(served: Served, tmp_path: Path) -> None:
    image = image_png(seed=12)
    path = tmp_path / "image.png"
    path.write_bytes(image)
    done = subprocess.run(
        ["node", str(FETCH_CLIENT), served.url, TOKEN, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    np.testing.assert_array_equal(
        np.asarray(result["text"], np.float32), grpc_vector(served.sdk, text="hello from node")
    )
    expected = grpc_vector(served.sdk, image)
    np.testing.assert_array_equal(np.asarray(result["image"], np.float32), expected)
    np.testing.assert_array_equal(result["int8"], np.clip(np.rint(expected * np.float32(127)), -127, 127))
    assert result["unauthenticated"] == 401
