"""A client-only install, made as a user makes it: a wheel built from the checkout as ``make dist``
builds it, installed with no extra into a fresh virtual environment (the base dependencies come
from pip's configured index, at the versions of ``constraints.txt``). There, against a real
server: ``info --server`` and ``extract --server`` work, the README's SDK samples run, and the
commands that run a model say which extra they need, in one line with exit code 2. Nothing of the
server extra is importable.

The environment is built once for the module (under a minute: the wheel is built from the
sources, with the generated protobuf code, as ``pip install`` does it).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from qwen25vl_embed import EmbeddingClient
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import assert_batched_close

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "examples" / "images" / "landscape.png"
# What building the wheel reads: the sdist's files (pyproject.toml) and the project file itself.
_SOURCES = ("pyproject.toml", "README.md", "protos", "client", "server")
# The server extra's modules (import names); none may be importable in the client-only install.
_SERVER_MODULES = (
    "torch",
    "torchvision",
    "transformers",
    "simplejpeg",
    "peft",
    "threadpoolctl",
    "prometheus_client",
    "grpc_health",
    "grpc_reflection",
)
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
# How ``make dist`` builds the wheel (then the folder and the source): the fixture builds it so.
_MAKE_DIST = ("-m", "pip", "wheel", "--no-deps", "--wheel-dir")


def _clean_env() -> dict[str, str]:
    """This process's environment without what would let a child see this test's packages."""
    return {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}


def _run(argv: list[str | Path], cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        env=_clean_env(),
    )


@pytest.fixture(scope="module")
def client_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The ``bin`` folder of a fresh virtual environment holding the package's wheel, built as
    ``make dist`` builds it (removed afterwards: it weighs about 150 MB).

    The sources are copied first, without generated code, so that the build must generate it and
    leaves the checkout's own generated modules alone."""
    base = tmp_path_factory.mktemp("client-only")
    source = base / "source"
    source.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*_pb2*.py", "*_pb2*.pyi")
    for name in _SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=skip)
        else:
            shutil.copy2(ROOT / name, source / name)
    venv = base / "venv"
    made = _run([sys.executable, "-m", "venv", venv], timeout=300)
    assert made.returncode == 0, made.stderr
    bin_dir = venv / "bin"
    wheels = base / "dist"
    built = _run([sys.executable, *_MAKE_DIST, wheels, source], timeout=600)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    (wheel,) = wheels.glob("qwen25vl_embed-*.whl")
    installed = _run([bin_dir / "python", "-m", "pip", "install", "-c", ROOT / "constraints.txt", wheel], timeout=600)
    assert installed.returncode == 0, installed.stdout[-4000:] + installed.stderr[-4000:]
    yield bin_dir
    shutil.rmtree(base, ignore_errors=True)


def test_the_install_has_the_client_and_nothing_of_the_server_extra(client_only: Path) -> None:
    probe = (
        "import importlib.util, json, sys\n"
        "import qwen25vl_embed\n"
        "from qwen25vl_embed_server.core.cpu import mkl_dispatch\n"
        "names = json.loads(sys.argv[1])\n"
        "present = [n for n in names if importlib.util.find_spec(n) is not None]\n"
        "print(json.dumps({'present': present, 'mkl': mkl_dispatch.state().reason}))\n"
    )
    done = _run([client_only / "python", "-c", probe, json.dumps(_SERVER_MODULES)])
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["present"] == []  # torch among them: this is a client-only install
    if sys.platform == "linux" and platform.machine() == "x86_64":  # elsewhere it stops before asking
        assert found["mkl"] == "torch is not installed: nothing to change"  # nothing built or loaded


def test_info_reports_the_server(client_only: Path, server: BackgroundServer, client: EmbeddingClient) -> None:
    done = _run([client_only / "qwen25vl-embed", "info", "--server", server.address])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json.loads(json.dumps(asdict(client.info())))


def test_extract_through_the_server_writes_the_files(
    client_only: Path, server: BackgroundServer, client: EmbeddingClient, tmp_path: Path
) -> None:
    done = _run([client_only / "qwen25vl-embed", "extract", IMAGE, "--outdir", tmp_path, "--server", server.address])
    assert done.returncode == 0, done.stderr
    folder = tmp_path / IMAGE.stem
    files = json.loads((folder / "manifest.json").read_text())["files"]
    expected = client.extract(IMAGE)
    assert set(expected.tensors) <= files.keys()
    for name, entry in files.items():
        array = np.load(folder / entry["file"])
        assert list(array.shape) == entry["shape"], name
        if name in expected.tensors:
            assert_batched_close(array, expected.tensors[name], name)


def test_readme_sdk_samples_run(client_only: Path, server: BackgroundServer, tmp_path: Path) -> None:
    """The Python blocks of the README's "Python SDK" section, run as written (the address aside)
    from a folder laid out as a clone of the repository (``examples/images/``)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Python SDK\n", 1)[1].split("\n## ", 1)[0]
    blocks = _BLOCK.findall(section)
    assert len(blocks) >= 2  # blocking and asyncio
    shutil.copytree(ROOT / "examples" / "images", tmp_path / "examples" / "images")
    for index, block in enumerate(blocks):
        sample = tmp_path / f"sample_{index}.py"
        sample.write_text(block.replace("localhost:50051", server.address))
        done = _run([client_only / "python", sample], cwd=tmp_path)
        assert done.returncode == 0, f"README Python SDK block {index}:\n{done.stderr}"
        assert "Error" not in done.stdout  # extract_many(errors="return") printed no failure


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        ("serve", ["serve", "--model", "tiny-random", "--port", "0"]),
        ("extract", ["extract", str(IMAGE), "--outdir", "{tmp}/out", "--model", "tiny-random"]),
        ("make-tiny-model", ["make-tiny-model", "{tmp}/tiny"]),
    ],
)
def test_model_commands_name_the_server_extra(client_only: Path, tmp_path: Path, command: str, argv: list[str]) -> None:
    done = _run([client_only / "qwen25vl-embed", *(arg.format(tmp=tmp_path) for arg in argv)])
    assert done.returncode == 2, done.stderr
    modules = "|".join(_SERVER_MODULES)
    # One line; which missing module is met first depends on the command.
    assert re.fullmatch(
        rf"error: {command} needs the server extra \(({modules}) is not installed\): "
        r"pip install 'qwen25vl-embed\[server\]'\n",
        done.stderr,
    ), done.stderr


def test_help_says_which_commands_need_the_server_extra(client_only: Path) -> None:
    done = _run([client_only / "qwen25vl-embed", "--help"])
    assert done.returncode == 0, done.stderr
    assert " ".join(done.stdout.split()).count("needs the server extra") >= 3  # serve, extract, make-tiny-model


def test_make_dist_builds_the_wheel_as_this_install_does() -> None:
    if shutil.which("make") is None:
        pytest.fail("make is needed: every target of the project runs through it")
    done = _run(["make", "--no-print-directory", "-n", "dist", "PYTHON=python-of-the-test"], cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [" ".join(["python-of-the-test", *_MAKE_DIST, "dist", "."])]
