"""``make demo`` installs the server extra and no more, and the demo runs on it.

The Makefile's recipe is read as make would run it on a machine without a venv (``make -n``); the
server package's imports, wherever they stand in a module (lazy ones too), and the demo's own are
held to what the base dependencies and the server extra bring (with what those need in turn:
transformers brings safetensors, tokenizers and huggingface_hub); the Ray room to the ray extra.
The demo then runs as ``make demo`` runs it: a real server process on the tiny model, the SDK.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "server" / "qwen25vl_embed_server"
DEMO = ROOT / "examples" / "demo.py"
OURS = {"qwen25vl_embed", "qwen25vl_embed_server"}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[\s;<>=!\[~(]", requirement, maxsplit=1)[0]).lower()


def _extra(name: str | None) -> set[str]:
    """The distributions the package's base (``None``) or one extra names."""
    names = set()
    for requirement in requires("qwen25vl-embed") or []:
        marker = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", requirement)
        if (marker[1] if marker else None) == name:
            names.add(_name(requirement))
    return names


def _closure(names: set[str]) -> set[str]:
    """``names`` and every distribution they require (unconditionally), as installed here."""
    found, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        try:
            requirements = requires(name) or []
        except PackageNotFoundError:
            continue
        todo += [_name(r) for r in requirements if "extra ==" not in r and "extra==" not in r]
    return found


def _imports(path: Path) -> set[str]:
    """The top-level names of everything ``path`` imports, at load or in a function body."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.partition(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name not in OURS}


def _beyond(paths: list[Path], allowed: set[str]) -> list[str]:
    distributions = packages_distributions()
    problems = []
    for path in paths:
        for name in sorted(_imports(path)):
            provided = {_name(d) for d in distributions.get(name, [name])}
            if not provided & allowed:
                problems.append(f"{path.relative_to(ROOT)} imports {name} ({', '.join(sorted(provided))})")
    return problems


def test_make_demo_installs_the_server_extra_only(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.fail("make is needed: every target of the project runs through it")
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", "demo", f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    installs = [line for line in done.stdout.splitlines() if " install " in line]
    assert installs, done.stdout
    assert any(line.endswith('-e ".[server]"') for line in installs), installs
    for line in installs:
        assert not re.search(r"\b(dev|ray|search|examples|colpali[-_]engine)\b", line), line
    assert done.stdout.splitlines()[-1] == f"{tmp_path / 'venv'}/bin/python examples/demo.py"


def test_the_server_and_the_demo_import_what_the_server_extra_brings() -> None:
    server = _closure(_extra(None) | _extra("server"))
    assert {"torch", "transformers", "safetensors", "huggingface-hub"} <= server  # the closure is followed
    modules = sorted(PACKAGE.rglob("*.py"))
    ray_room = [path for path in modules if path.relative_to(PACKAGE).parts[0] == "ray"]
    assert ray_room
    others = [path for path in modules if path not in ray_room]
    assert _beyond([*others, DEMO], server) == []
    assert _beyond(ray_room, server | _closure(_extra("ray"))) == []


def test_the_check_finds_a_dev_tool() -> None:
    dev = Path(__file__)  # this test imports pytest, which only the dev extra brings
    assert _beyond([dev], _closure(_extra(None) | _extra("server"))) == [
        f"{dev.relative_to(ROOT)} imports pytest (pytest)"
    ]


def test_the_demo_runs(tmp_path: Path) -> None:
    demo = [sys.executable, str(DEMO)]
    done = subprocess.run(demo, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "$ qwen25vl-embed serve --model tiny-random --port 0"
    assert any(line.startswith("landscape.png: ") for line in lines), done.stdout
    assert (tmp_path / "out" / "demo" / "landscape" / "manifest.json").is_file()
    assert lines[-1] == "server stopped (exit code 0)"
