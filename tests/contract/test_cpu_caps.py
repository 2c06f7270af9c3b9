"""The AVX2 caps (``tests/cpu_caps.py``) take effect on this machine, and the probe reads each
library as it reports itself: without caps it finds the capability this process runs."""

from __future__ import annotations

import os

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
