"""The suite as an AVX2-only CPU runs it, on any x86-64 CPU with AVX2.

torch's CPU work runs in three libraries, each choosing its kernels by the CPU: ATen's own
kernels, oneDNN (bf16 matmuls, packed weights, convolutions) and MKL (fp32 matmuls). Each has a
setting that caps it below the CPU, read once when the library loads:

- ``ATEN_CPU_CAPABILITY=avx2``: ATen's vectorised kernels;
- ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN (and with it torch's bf16 kernels: oneDNN has none on AVX2);
- ``MKL_ENABLE_INSTRUCTIONS=AVX2``: MKL's code path.

A cap that a library ignored would prove nothing, so :func:`check` runs a child process with the
caps, makes each library run a kernel, and reads what each reports it runs: torch's capability,
oneDNN's verbose ISA line and MKL's verbose version line. ``python -m tests.cpu_caps [PYTEST
ARGS]`` checks, then runs pytest with the caps (``make test-avx2``; ``.ci/run`` runs it after the
suite, so an AVX-512 machine proves the AVX2 path as well).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping

CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
"""The settings that make torch, oneDNN and MKL run as on an AVX2-only CPU."""

_PROBE = """
import qwen25vl_embed_server  # as every entry point does: MKL's dispatch before torch loads
import torch
from torch.nn import functional

x = torch.randn(64, 64)
functional.linear(x, x)  # fp32 matmul: MKL's
packed = torch.ops.mkldnn._reorder_linear_weight(x, None)
torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")  # oneDNN's
print("torch:" + torch.backends.cpu.get_cpu_capability(), flush=True)
"""
_ONEDNN = re.compile(r"^onednn_verbose,(?:v1,)?info,cpu,isa:(?P<isa>.+)$", re.MULTILINE)
# "... for Intel(R) 64 architecture <ISA>[ enabled processors], Lnx 2.10GHz lp64 gnu_thread"
_MKL = re.compile(r"^MKL_VERBOSE .*? architecture (?P<isa>.+?)(?: enabled processors)?, \w+ [\d.]+GHz", re.MULTILINE)
_TORCH = re.compile(r"^torch:(?P<isa>\S+)$", re.MULTILINE)


def probe(env: Mapping[str, str]) -> dict[str, str]:
    """What each library runs in a child process with ``env``: ``{"torch": ..., "oneDNN": ...,
    "MKL": ...}`` as each reports it (a library that printed nothing is missing)."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env={**env, "MKL_VERBOSE": "1", "ONEDNN_VERBOSE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    found: dict[str, str] = {}
    for name, pattern in (("torch", _TORCH), ("oneDNN", _ONEDNN), ("MKL", _MKL)):
        if match := pattern.search(done.stdout):
            found[name] = match["isa"].strip()
    return found


def problems(found: Mapping[str, str]) -> list[str]:
    """Why ``found`` (from :func:`probe`) is not an AVX2-only run: one line per library."""
    wrong = []
    if found.get("torch") != "AVX2":
        wrong.append(f"torch runs {found.get('torch', 'nothing it reported')}, not AVX2 (ATEN_CPU_CAPABILITY)")
    if found.get("oneDNN") != "Intel AVX2":
        wrong.append(f"oneDNN runs {found.get('oneDNN', 'nothing it reported')}, not AVX2 (ONEDNN_MAX_CPU_ISA)")
    mkl = found.get("MKL", "")
    if "(Intel(R) AVX2)" not in mkl or "512" in mkl:
        wrong.append(f"MKL runs {mkl or 'nothing it reported'}, not AVX2 (MKL_ENABLE_INSTRUCTIONS)")
    return wrong


def capped_env() -> dict[str, str]:
    """This process's environment with the caps."""
    return {**os.environ, **CAPS}


def main(argv: list[str]) -> int:
    env = capped_env()
    found = probe(env)
    if wrong := problems(found):
        print("the AVX2 caps did not take effect:", *wrong, sep="\n  ", file=sys.stderr)
        return 2
    print("capped to AVX2: " + ", ".join(f"{name} {isa}" for name, isa in found.items()), flush=True)
    return subprocess.call([sys.executable, "-m", "pytest", *argv], env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
