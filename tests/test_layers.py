"""The layering the project promises: the core never imports gRPC; the SDK never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys


def _modules_after_import(*modules: str) -> set[str]:
    code = f"import sys, json\nfor m in {list(modules)!r}: __import__(m)\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(done.stdout))


def test_the_extraction_core_imports_no_grpc_and_no_generated_code() -> None:
    core = [
        "qwen25vl_embed_server.core.extractor",
        "qwen25vl_embed_server.core.batcher",
        "qwen25vl_embed_server.core.image_decoding",
        "qwen25vl_embed_server.core.loading",
    ]
    loaded = _modules_after_import(*core)
    assert "torch" in loaded  # the probe works: the core does load torch
    leaked = sorted(m for m in loaded if m.split(".")[0] == "grpc" or "embed_pb2" in m)
    assert leaked == []


def test_the_client_sdk_imports_no_torch_and_no_transformers() -> None:
    loaded = _modules_after_import("qwen25vl_embed", "qwen25vl_embed.aio", "qwen25vl_embed.extract_many")
    assert "grpc" in loaded
    assert {"torch", "transformers", "qwen25vl_embed_server"}.isdisjoint(loaded)


def test_the_cli_imports_no_torch_until_a_command_needs_the_model() -> None:
    loaded = _modules_after_import("qwen25vl_embed_server.cli")
    assert {"torch", "transformers"}.isdisjoint(loaded)
