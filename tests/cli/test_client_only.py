"""A client-only install (``pip install qwen25vl-embed``, no server extra): the commands that run a
model say which extra they need, in one line with exit code 2; ``extract --server`` works.

Run in a child interpreter whose import system hides the server extra's packages, which is what
such an install looks like to the CLI (without building another virtual environment).
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from pathlib import Path

from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import noise_image

_CHILD = """
import contextlib, io, json, sys

HIDDEN = {"torch", "torchvision", "transformers", "grpc_health", "grpc_reflection", "prometheus_client"}

class HideServerExtra:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, HideServerExtra())
from qwen25vl_embed_server.cli import main
from qwen25vl_embed_server.cli.app import build_parser

results = {"help": build_parser().format_help()}
for name, argv in json.loads(sys.argv[1]).items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    results[name] = [code, err.getvalue()]
results["imported"] = sorted(m for m in sys.modules if m.partition(".")[0] in HIDDEN)
from qwen25vl_embed_server.core import mkl_dispatch
results["mkl"] = mkl_dispatch.state().reason
print(json.dumps(results))
"""


def test_client_only_install_names_the_server_extra(tmp_path: Path, server: BackgroundServer) -> None:
    image = tmp_path / "cat.png"
    noise_image(56, 56).save(image)
    runs = {
        "serve": ["serve", "--model", "tiny-random", "--port", "0"],
        "make-tiny-model": ["make-tiny-model", str(tmp_path / "tiny")],
        "extract-here": ["extract", str(image), "--outdir", str(tmp_path / "here"), "--model", "tiny-random"],
        "extract-server": ["extract", str(image), "--outdir", str(tmp_path / "remote"), "--server", server.address],
    }
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(runs)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    for name in ("serve", "make-tiny-model", "extract-here"):
        code, err = results[name]
        command = name.removesuffix("-here")
        assert code == 2, (name, err)
        # One line; which missing package is met first depends on the command.
        assert re.fullmatch(
            rf"error: {command} needs the server extra \((torch|transformers|grpc_health) is not installed\): "
            r"pip install 'qwen25vl-embed\[server\]'\n",
            err,
        ), (name, err)
    code, err = results["extract-server"]
    assert code == 0, err
    assert (tmp_path / "remote" / "cat" / "manifest.json").is_file()
    assert results["imported"] == []
    if sys.platform == "linux" and platform.machine() == "x86_64":  # elsewhere it stops before asking
        assert results["mkl"] == "torch is not installed: nothing to change"  # nothing built or loaded
    assert (
        " ".join(results["help"].split()).count("needs the server extra") >= 3
    )  # serve, extract in-process, make-tiny-model
