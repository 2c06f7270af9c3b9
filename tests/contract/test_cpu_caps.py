"""The AVX2 caps (``tests/cpu_caps.py``) take effect on this machine, and the probe reads each
library as it reports itself: without caps it finds the capability this process runs. Under the
caps, torch fails where an AVX2-only CPU fails (bf16 packing)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from tests import cpu_caps


def test_each_cap_takes_effect() -> None:
    found = cpu_caps.probe(cpu_caps.capped_env())
    assert cpu_caps.problems(found) == []
    assert found["torch"] == "AVX2"
    assert found["oneDNN"] == "Intel AVX2"
    assert "(Intel(R) AVX2)" in found["MKL"]


def test_without_caps_the_probe_reads_what_this_process_runs() -> None:
    plain = {name: value for name, value in os.environ.items() if name not in cpu_caps.CAPS}
    found = cpu_caps.probe(plain)
    assert set(found) == {"torch", "oneDNN", "MKL"}
    if not any(name in os.environ for name in cpu_caps.CAPS):  # this process is not capped itself
        assert found["torch"] == torch.backends.cpu.get_cpu_capability()
    # On a CPU with AVX-512 nothing is capped, so the check says so for each library.
    if found["torch"] != "AVX2":
        assert len(cpu_caps.problems(found)) == 3


def test_capped_torch_refuses_bf16_packing_as_an_avx2_cpu_does() -> None:
    """What the product must route around on an AVX2 CPU happens under the caps on any CPU:
    oneDNN's bf16 weight packing is refused, with the error an AVX2-only CPU gives."""
    code = (
        "import qwen25vl_embed_server, torch\n"
        "print(torch.ops.mkldnn._is_mkldnn_bf16_supported())\n"
        "try:\n"
        "    torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=torch.bfloat16), None)\n"
        "except RuntimeError as err:\n"
        "    print(str(err).splitlines()[0])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=cpu_caps.capped_env(), capture_output=True, text=True, timeout=120, check=True
    )
    supported, error = done.stdout.splitlines()
    assert supported == "False"
    assert error.startswith("mkldnn_reorder_linear_weight: bf16 path needs the cpu support"), error
