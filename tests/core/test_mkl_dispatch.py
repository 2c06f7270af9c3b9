"""MKL's dispatch by CPU features (core/cpu/mkl_dispatch.py): applied before torch, in fresh processes.

The dispatch is a state of the whole process, so every case runs a fresh interpreter. Whether it
applies depends on the machine (not on an Intel CPU, on Linux x86-64): the expectation is computed
from the machine's CPU, never skipped.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from qwen25vl_embed_server.core.cpu import mkl_dispatch

from ..helpers import applies_here

# The state, whether MKL's symbol resolves to the loaded definition, and its answer.
PROBE = """
import ctypes, json, sys
{before}
import qwen25vl_embed_server
import torch
from qwen25vl_embed_server.core.cpu import mkl_dispatch
state = mkl_dispatch.state()
resolved = answer = None
if state.library is not None:
    ours = ctypes.CDLL(str(state.library))
    found = ctypes.CDLL(None).mkl_serv_intel_cpu_true
    address = lambda function: ctypes.cast(function, ctypes.c_void_p).value
    resolved = address(found) == address(ours.mkl_serv_intel_cpu_true)
    answer = found()
torch.nn.functional.linear(torch.ones(4, 8), torch.ones(3, 8))  # MKL runs after it, whatever it chose
print(json.dumps({{"applied": state.applied, "reason": state.reason, "resolved": resolved, "answer": answer}}))
"""


def probe(tmp_path: Path, before: str = "", **environment: str) -> dict[str, object]:
    env = {key: value for key, value in os.environ.items() if key != mkl_dispatch.ENV}
    env.update(QWEN25VL_EMBED_CACHE=str(tmp_path / "cache"), **environment)
    run = subprocess.run(
        [sys.executable, "-c", PROBE.format(before=before)], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr
    result: dict[str, object] = json.loads(run.stdout.splitlines()[-1])
    return result


def test_by_default_mkl_chooses_by_features_where_it_would_choose_by_vendor(tmp_path: Path) -> None:
    result = probe(tmp_path)
    assert result["applied"] is applies_here(), result["reason"]
    if applies_here():
        # MKL's own symbol, looked up as its callers' linkage does, is the loaded definition.
        assert result["resolved"] is True
        assert result["answer"] == 1
        assert list((tmp_path / "cache").glob("mkl-dispatch-*.so"))
    else:
        assert "Intel" in str(result["reason"]) or "Linux" in str(result["reason"])


def test_the_built_definition_is_reused_by_later_processes(tmp_path: Path) -> None:
    def builds() -> dict[str, int]:  # each file's inode: a rebuild renames a new file over it
        return {path.name: path.stat().st_ino for path in (tmp_path / "cache").glob("mkl-dispatch-*")}

    first = probe(tmp_path)
    built = builds()
    second = probe(tmp_path)
    assert first["applied"] == second["applied"]
    assert len(built) == int(applies_here())
    assert builds() == built


@pytest.mark.skipif(not applies_here(), reason="a build is only made where the dispatch applies")
def test_a_damaged_cached_build_is_built_again(tmp_path: Path) -> None:
    probe(tmp_path)
    (cached,) = (tmp_path / "cache").glob("mkl-dispatch-*.so")
    cached.write_bytes(b"not an ELF file")
    result = probe(tmp_path)
    assert result["applied"] is True, result["reason"]
    assert result["resolved"] is True
    assert cached.read_bytes()[:4] == b"\x7fELF"


def test_vendor_keeps_mkls_own_choice(tmp_path: Path) -> None:
    result = probe(tmp_path, **{mkl_dispatch.ENV: "vendor"})
    assert result["applied"] is False
    assert result["reason"] == f"{mkl_dispatch.ENV}=vendor: MKL's own choice"
    assert result["resolved"] is None


def test_an_unknown_mode_is_named_and_changes_nothing(tmp_path: Path) -> None:
    result = probe(tmp_path, **{mkl_dispatch.ENV: "fastest"})
    assert result["applied"] is False
    assert "'fastest' is not one of features, vendor" in str(result["reason"])


@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64", reason="Linux x86-64 only")
def test_torch_loaded_first_is_named_and_changes_nothing(tmp_path: Path) -> None:
    result = probe(tmp_path, before="import torch")
    assert result == {
        "applied": False,
        "reason": "torch was loaded before qwen25vl_embed_server: MKL's own choice",
        "resolved": None,
        "answer": None,
    }


@pytest.mark.skipif(not applies_here(), reason="a compiler is only looked for where the dispatch applies")
def test_without_a_compiler_it_says_so_and_torch_still_runs(tmp_path: Path) -> None:
    empty = tmp_path / "bin"  # a PATH with neither cc nor gcc
    empty.mkdir()
    result = probe(tmp_path, PATH=str(empty), CC="cc")
    assert result["applied"] is False
    assert (
        result["reason"]
        == "could not build or load the definition (no C compiler (cc or gcc) on PATH): MKL's own choice"
    )


def test_concurrent_first_builds_all_apply(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != mkl_dispatch.ENV}
    env["QWEN25VL_EMBED_CACHE"] = str(tmp_path / "cache")
    code = "import qwen25vl_embed_server.core.cpu.mkl_dispatch as m; print(m.state().applied)"
    runs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env) for _ in range(4)
    ]
    outputs = [run.communicate(timeout=120)[0].strip() for run in runs]
    assert outputs == [str(applies_here())] * 4
    cache = tmp_path / "cache"  # made only for a build: not on Intel's CPUs, where MKL needs no dispatch
    assert len(list(cache.iterdir()) if cache.exists() else []) == int(applies_here())


def test_this_process_chose_as_the_servers_do() -> None:
    """The suite's references (transformers, here) run under the dispatch its servers run under,
    so bit-exact comparisons compare the same kernels: conftest imports the package before torch."""
    assert mkl_dispatch.state().applied is applies_here(), mkl_dispatch.state().reason


@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64", reason="Linux x86-64 only")
def test_without_torch_installed_nothing_is_built(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CLI of a client-only install imports the package too: no compiler call for it."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.delitem(sys.modules, "torch")  # restored after the test; nothing here imports it
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "torch" else real_find_spec(name))
    monkeypatch.setenv("QWEN25VL_EMBED_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(mkl_dispatch.ENV, raising=False)
    assert mkl_dispatch._decide() == mkl_dispatch.MklDispatch(False, "torch is not installed: nothing to change")
    assert not (tmp_path / "cache").exists()
