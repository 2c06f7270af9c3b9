"""Which comparisons of the model's outputs are bit-exact on this CPU, and which hold only within
float rounding: measured, then written as data.

    python -m bench.cpu.exactness                  # about a minute on 2 cores
    python -m bench.cpu.exactness --output x.json  # elsewhere than bench/results/cpu-exactness-<cpu>.json

The tiny random-weight checkpoint in fp32 on the CPU, three requests of one image each (noise
images 300x200, 200x300 and 252x252, one prompt), outputs ``vision_tokens``, ``projected_tokens``,
``lm_last_hidden`` and ``lm_pooled_mean``. The images differ in shape but their sequences are
close enough in length for the core to run the three as one batch in one forward (a 112x84 image
beside a 224x448 one would run in a forward of its own, alone again). Every run is a fresh child
process of this module (``--measure``), twice per instruction-set setting: this CPU as it is, and
capped to AVX2 (``tests/cpu_caps.py``: torch, oneDNN and MKL each run their AVX2 kernels, checked
by a probe). "All threads" is torch's default count in the child.

Comparisons, each per instruction-set setting:

  a. the core vs transformers' own forward (``tests/core/test_fidelity.py``'s reference), same
     process, all threads, each request alone
  b. the same at 1 thread
  c. the core at all threads vs the core at 1 thread, two processes
  d. the core in two processes with the same settings (all threads, and 1 thread)
  e. the three requests as one batch (``Extractor.run([a, b, c])``) vs each alone, same process
and across them:
  f. this CPU vs capped to AVX2, as two different CPUs would be (all threads, and 1 thread)

For every comparison and output: whether the arrays are bit-equal, and the largest difference
relative to the largest entry (``max |a - b| / max |b|``, ``b`` the second side). Prints a table;
writes it, the machine (CPU model, the flags that choose kernels, CPUs), the versions, the commit
and the date to ``bench/results/cpu-exactness-<cpu>.json``.
"""

from __future__ import annotations

import qwen25vl_embed_server  # noqa: F401  (first: it sets MKL's dispatch before torch loads)

# isort: split
import argparse
import json
import os
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from tests.cpu_caps import CAPS, probe, problems
from tests.helpers import noise_image, png_bytes

from bench.common import ROOT, Benchmark, module_command
from qwen25vl_embed_server.core.cpu.mkl_dispatch import state as mkl_dispatch_state
from qwen25vl_embed_server.core.fixtures.tiny_model import build_tiny_model
from qwen25vl_embed_server.core.model.extractor import Extractor, similar_lengths
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model

BENCH = Benchmark(__spec__.name, __doc__)

SIZES = [(300, 200), (200, 300), (252, 252)]
PROMPT = "What is in the picture?"
OUTPUTS = ["vision_tokens", "projected_tokens", "lm_last_hidden", "lm_pooled_mean"]
ISAS = ("native", "avx2")
PROCESSES = ("first", "second")

Run = list[dict[str, np.ndarray]]  # one run: per request, output name -> array


# --- the child process: one set of runs, saved -----------------------------------------------


def _reference_outputs(reference: Any, image: Any) -> dict[str, np.ndarray]:
    """transformers' own outputs for one image, as the fidelity tests compute them."""
    ref = reference.run([png_bytes(image)], PROMPT)
    return {
        "vision_tokens": ref["vision_tokens"].numpy(),
        "projected_tokens": ref["projected_tokens"].numpy(),
        "lm_last_hidden": ref["lm_last_hidden"].numpy(),
        "lm_pooled_mean": ref["lm_last_hidden"][0].mean(0, keepdim=True).numpy(),
    }


def measure(process: str, model: Path, saved: Path) -> dict[str, Any]:
    """The runs of one child process, saved to ``saved`` (.npz, keys ``run/request/output``).

    Both processes: ``core-all`` and ``core-1`` (the core, each request alone, at all threads and
    at 1). The first adds ``transformers-all``, ``transformers-1`` and ``core-batch`` (the three
    requests as one batch, all threads)."""
    from tests.core.test_fidelity import Reference  # pytest and the reference: the child alone

    extractor = Extractor(load_model(LoadOptions(model=str(model), device="cpu", dtype="float32")))
    reference = Reference(model) if process == "first" else None
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    plan = extractor.plan(OUTPUTS)
    prepared = [extractor.prepare([image], PROMPT, plan) for image in images]
    width = torch.get_num_threads()
    runs: dict[str, Run] = {}
    for label, threads in (("all", width), ("1", 1)):
        torch.set_num_threads(threads)
        runs[f"core-{label}"] = [extractor.run([item])[0].tensors for item in prepared]
        if reference is not None:
            runs[f"transformers-{label}"] = [_reference_outputs(reference, image) for image in images]
    torch.set_num_threads(width)
    if reference is not None:
        runs["core-batch"] = [result.tensors for result in extractor.run(prepared)]
    arrays: dict[str, Any] = {
        f"{run}/{i}/{name}": out[name] for run, outs in runs.items() for i, out in enumerate(outs) for name in OUTPUTS
    }
    np.savez(saved, **arrays)
    lengths = [item.sequence_length for item in prepared]
    dispatch = mkl_dispatch_state()
    return {
        "threads": width,
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_dispatch": {"applied": dispatch.applied, "reason": dispatch.reason},
        "requests": {
            "sequence_lengths": lengths,
            "lm_forwards_when_batched": len(similar_lengths(range(len(prepared)), lengths)),
        },
    }


def load_runs(saved: Path) -> dict[str, Run]:
    """What :func:`measure` saved, as run name -> per-request outputs."""
    runs: dict[str, Run] = {}
    with np.load(saved) as data:
        for key in data.files:
            run, request, name = key.split("/")
            requests = runs.setdefault(run, [])
            while len(requests) <= int(request):
                requests.append({})
            requests[int(request)][name] = data[key]
    return runs


# --- the comparisons ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """One row: ``pairs`` of runs (first side, second side), compared request by request."""

    key: str
    name: str
    isa: str
    pairs: Sequence[tuple[Run, Run]]

    def per_output(self) -> dict[str, dict[str, Any]]:
        """Output name -> ``bit_equal`` and ``max_relative_difference`` over every pair and request."""
        found = {}
        for name in OUTPUTS:
            equal, largest_difference, largest_entry = True, 0.0, 0.0
            for first, second in self.pairs:
                for a_out, b_out in zip(first, second, strict=True):
                    a, b = a_out[name], b_out[name]
                    if a.shape != b.shape:
                        raise ValueError(f"{self.key}: {name} has shapes {a.shape} and {b.shape}")
                    equal = equal and bool(np.array_equal(a, b))
                    largest_difference = max(largest_difference, float(np.abs(a.astype(np.float64) - b).max()))
                    largest_entry = max(largest_entry, float(np.abs(b).max()))
            relative = largest_difference / largest_entry if largest_entry else largest_difference
            found[name] = {"bit_equal": equal, "max_relative_difference": relative}
        return found

    def row(self) -> dict[str, Any]:
        outputs = self.per_output()
        return {
            "comparison": self.key,
            "description": self.name,
            "isa": self.isa,
            "bit_exact": all(o["bit_equal"] for o in outputs.values()),
            "max_relative_difference": max(o["max_relative_difference"] for o in outputs.values()),
            "outputs": outputs,
        }


def comparisons(runs: Mapping[tuple[str, str], dict[str, Run]]) -> list[Comparison]:
    """The rows a-f from the runs of every (isa, process)."""
    rows = []
    for isa in ISAS:
        first, second = runs[isa, "first"], runs[isa, "second"]
        both_widths = [(first["core-all"], second["core-all"]), (first["core-1"], second["core-1"])]
        for key, name, pairs in (
            ("a", "core vs transformers, same process, all threads", [(first["core-all"], first["transformers-all"])]),
            ("b", "core vs transformers, same process, 1 thread", [(first["core-1"], first["transformers-1"])]),
            ("c", "core all threads vs 1 thread, two processes", [(first["core-all"], second["core-1"])]),
            ("d", "core, two processes, same settings", both_widths),
            ("e", "one batch of 3 vs each alone, same process", [(first["core-batch"], first["core-all"])]),
        ):
            rows.append(Comparison(key, name, isa, pairs))
    native, avx2 = runs["native", "first"], runs["avx2", "first"]
    across = [(native["core-all"], avx2["core-all"]), (native["core-1"], avx2["core-1"])]
    rows.append(Comparison("f", "this CPU vs capped to AVX2, same settings", "both", across))
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table."""
    lines = [f"{'comparison':52} {'ISA':6} {'bit-exact':9} {'max rel. diff':>13}  outputs that differ"]
    for row in rows:
        differ = [name for name, o in row["outputs"].items() if not o["bit_equal"]]
        lines.append(
            f"{row['comparison'] + '. ' + row['description']:52} {row['isa']:6} "
            f"{'yes' if row['bit_exact'] else 'no':9} {row['max_relative_difference']:13.1e}  "
            f"{', '.join(differ) or '-'}"
        )
    return "\n".join(lines)


# --- the whole run -----------------------------------------------------------------------------


def environments() -> dict[str, dict[str, str]]:
    """Each ISA setting's child environment: this CPU as it is (no caps), and capped to AVX2."""
    bare = {key: value for key, value in os.environ.items() if key not in CAPS}
    return {"native": bare, "avx2": {**bare, **CAPS}}


def child(process: str, model: Path, saved: Path, env: Mapping[str, str]) -> dict[str, Any]:
    command = module_command(__spec__.name, "--measure", process, str(model), str(saved))
    environment = {**env, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    done = subprocess.run(command, env=environment, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    figures: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return figures


def main(argv: Sequence[str] | None = None) -> None:
    parser = BENCH.parser(argv)
    parser.add_argument("--measure", nargs=3, metavar=("PROCESS", "MODEL", "SAVED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        process, model, saved = args.measure
        print(json.dumps(measure(process, Path(model), Path(saved))))
        return

    settings: dict[str, dict[str, Any]] = {}
    runs: dict[tuple[str, str], dict[str, Run]] = {}
    requests: dict[str, Any] = {}
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # unannotated
    with tempfile.TemporaryDirectory() as work:
        model = build_tiny_model(Path(work) / "tiny")
        for isa, env in environments().items():
            libraries = probe(env)
            if isa == "avx2" and (wrong := problems(libraries)):
                raise SystemExit("the AVX2 caps did not take effect:\n  " + "\n  ".join(wrong))
            settings[isa] = {"environment": {k: env[k] for k in CAPS if k in env}, "libraries": libraries}
            for process in PROCESSES:
                saved = Path(work) / f"{isa}-{process}.npz"
                figures = child(process, model, saved, env)
                requests = figures.pop("requests")  # the same in every process
                settings[isa][f"{process}_process"] = figures
                runs[isa, process] = load_runs(saved)
    rows = [comparison.row() for comparison in comparisons(runs)]
    print(table(rows))
    details = {
        "model": "tiny random-weight Qwen2.5-VL (core/fixtures/tiny_model.py, default shape), float32, CPU",
        "requests": {
            "image_sizes": [f"{w}x{h}" for w, h in SIZES],
            "prompt": PROMPT,
            "outputs": OUTPUTS,
            **requests,
        },
        "isa_settings": settings,
    }
    BENCH.write(args, rows, details=details)


if __name__ == "__main__":
    main()
