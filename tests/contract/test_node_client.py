"""The Node.js example (examples/node) against the real server: same numbers as the Python SDK.

Needs Node.js 20+ and npm (CI installs them); `npm ci` runs here when node_modules is stale.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import pytest

from qwen25vl_embed import EmbeddingClient
from qwen25vl_embed.requests import build_request
from qwen25vl_embed.v1 import embed_pb2_grpc as pb_grpc
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import noise_image, png_bytes, server_config
from ..npm import npm_ci

NODE_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"
# 448x448 and 896x896 give 1024 + 4096 vision patches of 64 values: 1.25 MiB of float32
# vision_tokens, more than the server's 1 MiB chunk, so that tensor arrives in several parts.
OUTPUTS = ["vision_tokens", "lm_last_token", "image_grid_thw", "visual_token_lens"]
PROMPT = "Compare the images."


@pytest.fixture(scope="session")
def node_example() -> Path:
    npm_ci(NODE_EXAMPLE)
    return NODE_EXAMPLE


def run_node(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["node", *args], cwd=NODE_EXAMPLE, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("node-images")
    paths = []
    for index, side in enumerate((448, 896)):
        path = folder / f"noise{index}.png"
        path.write_bytes(png_bytes(noise_image(side, side, seed=index + 1)))
        paths.append(path)
    return paths


def server_parts(address: str, images: list[Path], dtype: str) -> dict[str, int]:
    """How many Tensor messages the server sends per output for this request (raw Python stub)."""
    request = build_request([p.read_bytes() for p in images], PROMPT, OUTPUTS, dtype)
    counts: dict[str, int] = {}
    with grpc.insecure_channel(address) as channel:
        for response in pb_grpc.EmbeddingServiceStub(channel).Extract(request):
            for tensor in response.tensors:
                counts[tensor.name] = counts.get(tensor.name, 0) + 1
    return counts


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_node_client_matches_python_client(
    node_example: Path,
    server: BackgroundServer,
    client: EmbeddingClient,
    images: list[Path],
    dtype: str,
) -> None:
    done = run_node(
        "extract.js",
        *map(str, images),
        "--server",
        server.address,
        "--outputs",
        ",".join(OUTPUTS),
        "--dtype",
        dtype,
        "--prompt",
        PROMPT,
        "--json",
    )
    assert done.returncode == 0, done.stderr
    node: dict[str, Any] = json.loads(done.stdout)
    expected = client.extract([p.read_bytes() for p in images], prompt=PROMPT, outputs=OUTPUTS, dtype=dtype)

    assert list(node["tensors"]) == list(expected.tensors)
    for name, array in expected.tensors.items():
        got = node["tensors"][name]
        assert got["shape"] == list(array.shape), name
        assert got["dtype"] == ("int64" if array.dtype == np.int64 else dtype), name
        # float16/bfloat16 widen exactly to float32, and float32 exactly to a JS number (a double).
        wanted = array.astype(np.int64 if array.dtype == np.int64 else np.float32).reshape(-1).tolist()
        assert got["values"] == wanted, name

    assert node["metadata"] == {
        "visual_token_lens": expected.visual_token_lens.tolist(),
        "image_grid_thw": expected.image_grid_thw.tolist(),
        "sequence_length": expected.sequence_length,
    }
    parts = {name: tensor["parts"] for name, tensor in node["tensors"].items()}
    assert parts == server_parts(server.address, images, dtype)
    if dtype == "float32":
        assert parts["vision_tokens"] > 1, "the request should have made the server chunk vision_tokens"


def test_node_client_reports_status_code(node_example: Path, server: BackgroundServer, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    done = run_node("extract.js", str(corrupt), "--server", server.address)
    assert done.returncode != 0
    assert "INVALID_ARGUMENT" in done.stderr
    assert "image 0" in done.stderr  # the server's details are passed on


def decode_with_node(data: bytes, dtype: str, tmp_path: Path) -> np.ndarray:
    """tensors.js's decodeBytes on ``data``, returned as the float32 array it produced."""
    source, result = tmp_path / "in.bin", tmp_path / "out.bin"
    source.write_bytes(data)
    script = (
        "const fs = require('fs'); const { decodeBytes } = require('./tensors');"
        "const [src, dtype, dst] = process.argv.slice(1);"
        "const out = decodeBytes(fs.readFileSync(src), dtype);"
        "const bytes = Buffer.alloc(out.length * 4);"  # explicitly little-endian, like the wire
        "out.forEach((v, i) => bytes.writeFloatLE(v, i * 4));"
        "fs.writeFileSync(dst, bytes);"
    )
    done = run_node("-e", script, str(source), dtype, str(result))
    assert done.returncode == 0, done.stderr
    return np.frombuffer(result.read_bytes(), dtype="<f4")


@pytest.mark.parametrize(
    ("dtype", "numpy_dtype"), [("DTYPE_FLOAT16", np.dtype("<f2")), ("DTYPE_BFLOAT16", np.dtype(ml_dtypes.bfloat16))]
)
def test_node_half_decoding_is_exact_for_every_bit_pattern(
    node_example: Path, tmp_path: Path, dtype: str, numpy_dtype: np.dtype
) -> None:
    """All 65536 patterns: zeros, subnormals, normals, infinities and NaNs, as numpy widens them."""
    bits = np.arange(1 << 16, dtype="<u2")
    expected = bits.view(numpy_dtype).astype(np.float32)
    got = decode_with_node(bits.tobytes(), dtype, tmp_path)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan)
    # Bit for bit (signed zeros included) wherever the value is not NaN.
    np.testing.assert_array_equal(got.view("<u4")[~nan], expected.view("<u4")[~nan])


@pytest.mark.parametrize(("dtype", "numpy_dtype"), [("DTYPE_INT8", np.dtype("i1")), ("DTYPE_UINT8", np.dtype("u1"))])
def test_node_decodes_the_int8_and_binary_vector_forms(
    node_example: Path, tmp_path: Path, dtype: str, numpy_dtype: np.dtype
) -> None:
    """Every byte value, as numpy reads it (the retrieval vectors' int8 and packed-bit forms)."""
    data = np.arange(256, dtype="u1").tobytes()
    expected = np.frombuffer(data, dtype=numpy_dtype).astype(np.float32)
    np.testing.assert_array_equal(decode_with_node(data, dtype, tmp_path), expected)


@pytest.mark.parametrize("encoding", ["float", "int8", "binary"])
def test_node_client_sends_retrieval_requests_as_the_sdk_does(
    node_example: Path, colqwen: Extractor, images: list[Path], encoding: str
) -> None:
    """A ColQwen2.5 server: a text query and an image document from Node (prompt format,
    Matryoshka dimensions and wire form on its command line) equal the SDK's embed_* vectors."""
    with BackgroundServer(colqwen, server_config()) as server, EmbeddingClient(server.address) as sdk:
        query = run_node(
            "extract.js", "--server", server.address, "--prompt", "a red bicycle", "--prompt-format", "query",
            "--dimensions", "64", "--vector-encoding", encoding, "--json",
        )  # fmt: skip
        document = run_node(
            "extract.js", str(images[0]), "--server", server.address, "--prompt-format", "document",
            "--dimensions", "64", "--vector-encoding", encoding, "--json",
        )  # fmt: skip
        expected_query = sdk.embed_queries(["a red bicycle"], 64, encoding=encoding)[0]
        expected_document = sdk.embed_images([images[0]], 64, encoding=encoding)[0]
    for done, expected in ((query, expected_query), (document, expected_document)):
        assert done.returncode == 0, done.stderr
        (tensor,) = json.loads(done.stdout)["tensors"].values()
        assert tensor["shape"] == list(expected.shape)
        wanted = expected.astype(np.float64 if encoding == "float" else np.int64).reshape(-1).tolist()
        assert tensor["values"] == wanted
