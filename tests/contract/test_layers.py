"""The layering the project promises (docs/architecture.md): each room imports only the rooms
below it; the core never imports gRPC or generated code; the SDK never imports torch."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import qwen25vl_embed_server

PACKAGE = Path(qwen25vl_embed_server.__file__).parent
ROOMS = ("core", "rpc", "ray", "cli")
# Which of our packages each room may import (the SDK is ``qwen25vl_embed``, with the generated
# code in ``qwen25vl_embed.v1``).
ALLOWED = {
    "core": {"core"},
    "rpc": {"core", "rpc", "sdk"},
    "ray": {"core", "rpc", "ray", "sdk"},
    "cli": {"core", "rpc", "ray", "cli", "sdk"},
}


def _modules_after_import(*modules: str) -> set[str]:
    code = f"import sys, json\nfor m in {list(modules)!r}: __import__(m)\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(done.stdout))


def _room_modules(room: str) -> list[str]:
    prefix = f"qwen25vl_embed_server.{room}."
    return [info.name for info in pkgutil.walk_packages([str(PACKAGE / room)], prefix) if not info.ispkg]


def _imported_rooms(path: Path) -> set[str]:
    """Our packages a module imports anywhere in its body (lazy imports and TYPE_CHECKING too)."""
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "qwen25vl_embed_server" and len(parts) > 1:
                rooms.add(parts[1])
            elif parts[0] == "qwen25vl_embed":
                rooms.add("sdk")
    return rooms


def test_every_module_lives_in_a_room() -> None:
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert loose == []


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_imports_only_the_rooms_below_it(room: str) -> None:
    modules = sorted((PACKAGE / room).rglob("*.py"))
    assert modules
    for path in modules:
        extra = _imported_rooms(path) - ALLOWED[room]
        assert not extra, f"{path.relative_to(PACKAGE)} imports {sorted(extra)}"


def test_the_whole_core_loads_no_grpc_and_no_generated_code() -> None:
    core = _room_modules("core")
    assert "qwen25vl_embed_server.core.pipeline" in core  # the walk finds the modules
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


def test_no_module_is_over_500_lines() -> None:
    roots = [PACKAGE, PACKAGE.parents[1] / "client" / "qwen25vl_embed"]
    long = {str(p): n for root in roots for p in root.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}
