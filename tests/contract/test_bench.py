"""The benchmark scripts run end to end (tiny model, CPU): the GPU script stays ready to use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench"


def test_gpu_benchmark_script_runs_on_the_cpu_with_a_small_config() -> None:
    command = [sys.executable, str(BENCH / "gpu_7b.py"), "--shape", "tiny", "--device", "cpu"]
    done = subprocess.run(
        [*command, "--dtype", "float32", "--quick"], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ("baseline (original script)", "in-process core, pooled", "service c=2, vision-only"):
        assert row in done.stdout
    assert "RPC overhead at concurrency 1" in done.stdout
    assert "TFLOP/s" in done.stdout
