"""MKL's kernels chosen by what the CPU can do, not by who made it.

torch's x86-64 wheels link Intel MKL, and MKL runs torch's fp32 matmuls (every linear layer of an
fp32 model without ``--fp32-matmul onednn``) and the CPU attention kernel's products, in fp32 and
in bf16. MKL asks ``mkl_serv_intel_cpu_true()``, a function of its own service layer, before it
looks at the CPU's features: on a CPU that is not Intel's it takes slower kernels, AVX-512 or not. On this
project's 2-core AMD EPYC with AVX-512, torch's fp32 linear at the benchmark LM's MLP shape runs
at 186 GFLOP/s, against 459 with the kernels MKL runs on Intel's AVX-512 CPUs, and the benchmark
model at 224 against 129 ms per image (``python -m bench.cpu.mkl_dispatch``, one run).

MKL calls that function through the procedure linkage table, so the first definition in the
process's global symbol scope answers for it. :func:`apply` compiles a one-line definition that
answers yes (the C compiler, once, into the project's cache folder: ``$QWEN25VL_EMBED_CACHE``,
else ``~/.cache/qwen25vl-embed``) and loads it with
``RTLD_GLOBAL``, before torch is loaded; MKL then chooses by the CPU's features (CPUID), as it does
on Intel's CPUs. Results stay deterministic, and transformers run in the same process computes the
same bits (the test suite's references do); against a process without it, fp32 results differ by
float rounding (9e-7 relative at the benchmark model's last token) and bf16 ones by bf16 rounding,
as results differ between an Intel and an AMD machine.

The package's ``__init__`` calls :func:`apply`, so it holds in every process that imports
``qwen25vl_embed_server`` before torch (the CLI, the server, Ray's actors, the tests). It changes
nothing off Linux x86-64, on Intel's CPUs, where torch is loaded first or not installed, or without
a C compiler; :func:`state` says which, and a damaged cached build is built again. Set
``QWEN25VL_EMBED_MKL_DISPATCH=vendor`` to keep MKL's own choice. Nothing here imports torch.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from qwen25vl_embed_server.core.defaults import cache_root

ENV = "QWEN25VL_EMBED_MKL_DISPATCH"
MODES = ("features", "vendor")
SYMBOL = "mkl_serv_intel_cpu_true"
SOURCE = f"/* {__name__}: MKL chooses its kernels by the CPU's features. */\nint {SYMBOL}(void) {{ return 1; }}\n"


@dataclasses.dataclass(frozen=True)
class MklDispatch:
    """What :func:`apply` did: ``applied`` (MKL chooses by features) and why, in words."""

    applied: bool
    reason: str
    library: Path | None = None


_state: MklDispatch | None = None


def state() -> MklDispatch:
    """The process's dispatch (applying it first if nothing has yet)."""
    return apply()


def apply() -> MklDispatch:
    """Make MKL choose its kernels by CPU features in this process, once; never raises."""
    global _state
    if _state is None:
        _state = _decide()
    return _state


def _decide() -> MklDispatch:
    mode = os.environ.get(ENV, "features")
    if mode not in MODES:
        return MklDispatch(False, f"{ENV}={mode!r} is not one of {', '.join(MODES)}: MKL's own choice")
    if mode == "vendor":
        return MklDispatch(False, f"{ENV}=vendor: MKL's own choice")
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return MklDispatch(False, f"not Linux x86-64 ({sys.platform} {platform.machine()}): nothing to change")
    if "torch" in sys.modules:
        return MklDispatch(False, "torch was loaded before qwen25vl_embed_server: MKL's own choice")
    if not _torch_installed():  # the CLI without the server extra: nothing will load MKL
        return MklDispatch(False, "torch is not installed: nothing to change")
    vendor = _cpu_vendor()
    if vendor == "GenuineIntel":
        return MklDispatch(False, "an Intel CPU: MKL already chooses by features")
    try:
        built = library()
        try:
            ctypes.CDLL(str(built), mode=ctypes.RTLD_GLOBAL)
        except OSError:  # a damaged cached build: build it again, once
            built.unlink(missing_ok=True)
            built = library()
            ctypes.CDLL(str(built), mode=ctypes.RTLD_GLOBAL)
    except subprocess.CalledProcessError as error:
        detail = error.stderr.decode(errors="replace").strip() or f"exit status {error.returncode}"
        return MklDispatch(False, f"the C compiler failed ({detail}): MKL's own choice")
    except (OSError, subprocess.SubprocessError, RuntimeError) as error:
        return MklDispatch(False, f"could not build or load the definition ({error}): MKL's own choice")
    return MklDispatch(True, f"CPU vendor {vendor or 'unknown'}: MKL chooses by features", built)


def _torch_installed() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # an import hook that refuses it, or a broken entry
        return False


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def library() -> Path:
    """The compiled definition (built once per source text; concurrent builders each rename theirs).
    Raises OSError, RuntimeError (no compiler) or subprocess.CalledProcessError."""
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    target = cache_root() / f"mkl-dispatch-{digest}.so"
    if target.exists():
        return target
    named = shlex.split(os.environ.get("CC", "cc")) or ["cc"]
    compiler = shutil.which(named[0]) or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        source = Path(work) / "mkl_dispatch.c"
        source.write_text(SOURCE)
        built = Path(work) / "mkl_dispatch.so"
        subprocess.run(
            [compiler, *named[1:], "-shared", "-fPIC", "-O2", "-o", str(built), str(source)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        os.replace(built, target)
    return target
