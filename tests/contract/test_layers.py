"""The layering the project promises (docs/architecture.md): each room imports only the rooms
below it; the core never imports gRPC or generated code, and inside it the CPU levers never import
scheduling, admission loads without torch and the offline fixtures serve only tests and the
command line; the SDK, and the command line's client path, import nothing but the standard library
and the base dependencies when they load; no module is over 400 lines."""

from __future__ import annotations

import ast
import json
import pkgutil
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import requires
from pathlib import Path

import pytest

import qwen25vl_embed
import qwen25vl_embed_server

PACKAGE = Path(qwen25vl_embed_server.__file__).parent
CLIENT = Path(qwen25vl_embed.__file__).parent
OURS = {"qwen25vl_embed", "qwen25vl_embed_server"}
# The functions that ``info --server`` and ``extract --server`` call beyond what loads with the
# console script, by module (their imports run when they are called).
CLIENT_PATH = {
    "qwen25vl_embed_server.cli.commands": ("info", "client_of", "server_info", "target_error"),
    "qwen25vl_embed_server.cli.extract": ("extract", "run_extract"),
}
# What ``pip install qwen25vl-embed`` (no extra) brings besides the standard library: the base
# dependencies (distribution -> the module it provides).
BASE_IMPORTS = {
    "grpcio": "grpc",
    "protobuf": "google.protobuf",
    "numpy": "numpy",
    "ml-dtypes": "ml_dtypes",
    "pillow": "PIL",
    "tqdm": "tqdm",
}
ROOMS = ("core", "rpc", "http", "ray", "cli")
# Which of our packages each room may import (the SDK is ``qwen25vl_embed``, with the generated
# code in ``qwen25vl_embed.v1``).
ALLOWED = {
    "core": {"core"},
    "rpc": {"core", "rpc", "sdk"},
    # The HTTP edge: the core, and of the gRPC edge only its transport-neutral modules (HTTP_FROM_RPC);
    # never the SDK's generated messages.
    "http": {"core", "rpc", "http"},
    "ray": {"core", "rpc", "ray", "sdk"},
    "cli": {"core", "rpc", "http", "ray", "cli", "sdk"},
}
CORE = PACKAGE / "core"
# What the HTTP edge shares with the gRPC edge: the bearer tokens, the TLS files, the one metrics
# registry and request log; and the server's config, for typing only.
HTTP_FROM_RPC = {"auth", "tls", "metrics", "observation", "server"}
# The one module outside the command line that may import the fixtures, inside a function: the
# loader builds the ``tiny-random`` checkpoint when it is asked for it by name.
FIXTURE_LOADERS = {"core/model/loading.py"}
MAX_LINES = 400


@dataclass(frozen=True)
class Loaded:
    """One of our modules as an import chain reaches it."""

    path: Path
    by: str  # the module whose import loaded it ("" for a root)
    imports: list[tuple[str, int]]  # (module, line): its import-time imports of others' modules


def _distribution(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _source(module: str) -> Path | None:
    """The file of one of our modules (a package's ``__init__.py``), or None for anyone else's."""
    top, _, rest = module.partition(".")
    root = {"qwen25vl_embed": CLIENT, "qwen25vl_embed_server": PACKAGE}.get(top)
    if root is None:
        return None
    base = root.joinpath(*rest.split(".")) if rest else root
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _guards_import(handler: ast.ExceptHandler) -> bool:
    caught = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(name, ast.Name) and name.id in {"ImportError", "ModuleNotFoundError"} for name in caught)


def _import_time_imports(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """(module name, line) of each import that runs when the module loads: not inside functions,
    not under ``if TYPE_CHECKING:``, not in a ``try`` that catches ImportError. ``from a import b``
    names both ``a`` and ``a.b`` (``b`` may be a submodule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    stack: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        elif isinstance(node, ast.Try) and any(_guards_import(handler) for handler in node.handlers):
            stack.extend([*node.handlers, *node.orelse, *node.finalbody])
        elif isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join([*anchor, *([node.module] if node.module else [])])
            yield source, node.lineno
            yield from ((f"{source}.{alias.name}", node.lineno) for alias in node.names if alias.name != "*")
        else:
            stack.extend(ast.iter_child_nodes(node))


def _imports_in(module: str, functions: tuple[str, ...]) -> list[str]:
    """Our modules that ``functions`` of ``module`` import when called (``from a import b``: ``a``
    and ``a.b``)."""
    path = _source(module)
    assert path is not None, module
    bodies = {
        node.name: node
        for node in ast.parse(path.read_text()).body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }
    assert set(functions) <= bodies.keys(), f"{module} has no {sorted(set(functions) - bodies.keys())}"
    names = []
    for node in (inner for name in functions for inner in ast.walk(bodies[name])):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return [name for name in names if name.partition(".")[0] in OURS]


def _reached(roots: list[str]) -> dict[str, Loaded]:
    """Each of our modules that loading ``roots`` loads (following import-time imports, and each
    module's parent packages), with its import-time imports of anyone else's modules."""
    reached: dict[str, Loaded] = {}
    todo = [(root, "") for root in roots]
    while todo:
        module, by = todo.pop(0)  # breadth first: the shortest chain from a root
        path = _source(module)
        if module in reached or path is None:
            continue
        reached[module] = loaded = Loaded(path, by, [])
        todo += [(module.rpartition(".")[0], module)] if "." in module else []
        for name, line in _import_time_imports(module, path):
            if name.partition(".")[0] in OURS:
                todo.append((name, module))
            else:
                loaded.imports.append((name, line))
    return reached


def _beyond_the_base(reached: dict[str, Loaded]) -> list[str]:
    """Import-time imports of modules that neither the standard library nor the base dependencies
    provide, as ``path:line imports name (loaded by a <- b <- root)``."""
    allowed = tuple(BASE_IMPORTS.values())
    problems: list[str] = []
    for loaded in sorted(reached.values(), key=lambda loaded: loaded.path):
        for name, line in loaded.imports:
            top = name.partition(".")[0]
            if top in sys.stdlib_module_names or any(name == m or name.startswith(f"{m}.") for m in allowed):
                continue
            if name == "google":  # the first half of `from google import protobuf`
                continue
            chain: list[str] = []
            by = loaded.by
            while by:
                chain.append(by)
                by = reached[by].by
            problems.append(f"{loaded.path}:{line} imports {name} (loaded by {' <- '.join(chain) or 'the test'})")
    return problems


def _modules_after_import(*modules: str) -> set[str]:
    code = f"import sys, json\nfor m in {list(modules)!r}: __import__(m)\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(done.stdout))


def _room_modules(room: str) -> list[str]:
    prefix = f"qwen25vl_embed_server.{room}."
    folder = PACKAGE.joinpath(*room.split("."))
    return [info.name for info in pkgutil.walk_packages([str(folder)], prefix) if not info.ispkg]


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


def test_the_http_edge_takes_only_the_grpc_edges_transport_neutral_modules() -> None:
    modules = sorted((PACKAGE / "http").rglob("*.py"))
    assert any(p.name == "app.py" for p in modules)
    for path in modules:
        rpc = {m.split(".")[2] for m in _imported_modules(path) if m.startswith("qwen25vl_embed_server.rpc.")}
        assert rpc <= HTTP_FROM_RPC, f"{path.relative_to(PACKAGE)} imports rpc.{sorted(rpc - HTTP_FROM_RPC)}"
        at_load = [name for name, _ in _import_time_imports(_module_name(path), path) if name.endswith(".rpc.server")]
        assert at_load == [], f"{path.relative_to(PACKAGE)} imports rpc.server when it loads"


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
    assert "qwen25vl_embed_server.core.scheduling.pipeline" in core  # the walk finds the modules
    loaded = _modules_after_import(*core)
    assert "torch" in loaded  # the probe works: the core does load torch
    leaked = sorted(m for m in loaded if m.split(".")[0] == "grpc" or "embed_pb2" in m)
    assert leaked == []


def test_the_base_imports_are_the_base_dependencies() -> None:
    requirements = requires("qwen25vl-embed") or []
    base = {_distribution(req) for req in requirements if "extra ==" not in req}
    assert base == set(BASE_IMPORTS)
    server_extra = {_distribution(req) for req in requirements if "extra == 'server'" in req}
    assert {"torch", "transformers", "simplejpeg"} <= server_extra  # the metadata is read right


def test_the_sdk_imports_only_the_base_dependencies() -> None:
    sdk = [info.name for info in pkgutil.walk_packages([str(CLIENT)], "qwen25vl_embed.")]
    assert "qwen25vl_embed.v1.embed_pb2_grpc" in sdk  # the walk finds the generated code too
    reached = _reached(["qwen25vl_embed", *sdk])
    assert sorted(m for m in reached if m.partition(".")[0] == "qwen25vl_embed_server") == []
    assert _beyond_the_base(reached) == []


def test_the_clis_client_path_imports_only_the_base_dependencies() -> None:
    """``info`` and ``extract --server`` run where only the base dependencies are installed: the
    console script's modules, what they import when they load, and what the functions of the
    client path import when called, import nothing else."""
    lazy = [name for module, functions in CLIENT_PATH.items() for name in _imports_in(module, functions)]
    assert "qwen25vl_embed_server.rpc.auth" in lazy  # client_of's bearer tokens
    reached = _reached(["qwen25vl_embed_server.cli", "qwen25vl_embed_server.cli.__main__", *lazy])
    assert "qwen25vl_embed_server.cli.inputs" in reached  # the walk follows our own imports
    assert _beyond_the_base(reached) == []


def test_the_base_import_check_finds_server_only_imports() -> None:
    reached = _reached(["qwen25vl_embed_server.core.model.image_decoding", "qwen25vl_embed_server.rpc.server"])
    found = {problem.partition(" imports ")[2].split()[0].partition(".")[0] for problem in _beyond_the_base(reached)}
    assert {"simplejpeg", "grpc_health", "grpc_reflection"} <= found


def test_no_module_is_over_500_lines() -> None:
    roots = [PACKAGE, PACKAGE.parents[1] / "client" / "qwen25vl_embed"]
    long = {str(p): n for root in roots for p in root.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


def test_no_server_module_is_over_400_lines() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path) -> set[str]:
    """Every module of ours a module imports anywhere in its body (``from a import b``: ``a`` and
    ``a.b``; relative imports resolved)."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join([*anchor, *([node.module] if node.module else [])])
            found |= {source, *(f"{source}.{alias.name}" for alias in node.names)}
    return {name for name in found if name.partition(".")[0] in OURS}


def test_the_core_is_in_rooms_of_its_own() -> None:
    """The core's modules live in its subpackages; only ``defaults`` and ``errors`` (leaves that
    every one of them reads) sit beside them."""
    assert sorted(p.name for p in CORE.glob("*.py")) == ["__init__.py", "defaults.py", "errors.py"]
    rooms = sorted(p.name for p in CORE.iterdir() if (p / "__init__.py").is_file())
    assert rooms == ["admission", "cpu", "fixtures", "model", "retrieval", "scheduling"]


def test_the_cpu_levers_never_import_scheduling() -> None:
    modules = sorted((CORE / "cpu").rglob("*.py"))
    assert any(p.name == "levers.py" for p in modules)
    for path in modules:
        scheduling = sorted(m for m in _imported_modules(path) if m.startswith("qwen25vl_embed_server.core.scheduling"))
        assert scheduling == [], f"{path.relative_to(PACKAGE)} imports {scheduling}"


def test_admission_loads_without_torch() -> None:
    """Admission checks a request before any model runs: none of its modules, nor anything they
    import when they load, imports torch or transformers."""
    admission = _room_modules("core.admission")
    assert "qwen25vl_embed_server.core.admission.request" in admission
    loaded = _modules_after_import(*admission)
    assert "qwen25vl_embed_server.core.admission.cost" in loaded  # the probe imported them
    assert sorted(m for m in loaded if m.partition(".")[0] in {"torch", "transformers"}) == []


def test_the_fixtures_serve_only_tests_and_the_command_line() -> None:
    """The offline checkpoints are imported by the command line (and by the fixtures themselves);
    elsewhere only by the loader, inside the function that builds ``tiny-random``."""
    for path in sorted(PACKAGE.rglob("*.py")):
        where = str(path.relative_to(PACKAGE))
        if where.startswith(("cli/", "core/fixtures/")):
            continue
        fixtures = sorted(m for m in _imported_modules(path) if m.startswith("qwen25vl_embed_server.core.fixtures"))
        if where in FIXTURE_LOADERS:
            at_load = [name for name, _ in _import_time_imports(_module_name(path), path) if ".fixtures" in name]
            assert at_load == [], f"{where} imports the fixtures when it loads"
        else:
            assert fixtures == [], f"{where} imports {fixtures}"
