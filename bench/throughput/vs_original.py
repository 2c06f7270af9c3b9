"""Throughput, in one run on one model and one set of images: the original script vs this project.

Rows:
  baseline      the original one-file script's method: transformers' model as ``from_pretrained``
                loads it (none of this project's forwards or kernels), in-process, one image per
                call, forward hooks, the full ``model(**inputs)`` forward with ``lm_head``,
                ``use_cache=False``
  in-process    the extraction core (``Extractor.extract``), one image at a time
  service       ``qwen25vl-embed serve`` in a child process, N concurrent SDK clients over gRPC,
                for pooled outputs, pooled + all token tensors, and vision-only outputs
The rows run in ``--rounds`` alternating rounds (every row one pass over the images per round,
the order reversed every other round), so that the machine's drift hits all of them alike. Every
row reports images/s (median over rounds), its ratio to the baseline (median of each round's
ratio) and p50 / p99 latency over all passes; then the RPC overhead (service at concurrency 1 vs
in-process, pooled outputs, image by image) and a tensor-transfer figure.

    python -m bench.throughput.vs_original                       # CPU: the 'bench' random-weight model
    python -m bench.throughput.vs_original --quick --shape tiny  # a smoke run (seconds)
    python -m bench.throughput.vs_original --fp32-matmul onednn  # the core and the service on oneDNN's
                                                                 # packed matmuls (the baseline stays
                                                                 # transformers')

MKL's kernel choice (``core/cpu/mkl_dispatch.py``) is a state of the whole process. On the CPU the
baseline runs in a child process of its own with MKL's own choice, as the original script did
(``--baseline-mkl-dispatch features`` gives it ours: the comparison without that lever); this
process and the server's take what the package ships (``QWEN25VL_EMBED_MKL_DISPATCH`` applies).
"""

from __future__ import annotations

import qwen25vl_embed_server  # noqa: F401  (first: it sets MKL's dispatch before torch loads)

# isort: split
import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from bench.common import (
    PROMPT,
    ROOT,
    SHAPES,
    Benchmark,
    alternating,
    checkpoint,
    concurrently,
    module_command,
    noise_png,
    sync,
)
from bench.service.transfer import TransferResult, measure_transfer
from qwen25vl_embed import EmbeddingClient
from qwen25vl_embed_server.core.cpu import mkl_dispatch
from qwen25vl_embed_server.core.defaults import DEFAULT_FP32_MATMUL, FP32_MATMULS
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.image_decoding import decode_image
from qwen25vl_embed_server.core.model.loading import LoadedModel, LoadOptions, load_model, resolve_device
from qwen25vl_embed_server.rpc.harness import ServerProcess

BENCH = Benchmark(__spec__.name, __doc__)
POOLED = ["vision_pooled_mean", "projected_pooled_mean", "lm_pooled_mean", "lm_image_pooled_mean", "lm_last_token"]
OUTPUT_SETS = {
    "pooled": [*POOLED, "visual_token_lens"],
    "full": ["vision_tokens", "projected_tokens", "lm_last_hidden", "lm_image_tokens", *POOLED, "visual_token_lens"],
    "vision-only": ["vision_tokens", "projected_tokens", "vision_pooled_mean", "projected_pooled_mean"],
}


@dataclass
class Row:
    name: str
    latencies: list[float]
    wall: float
    server_ms: list[float] = field(default_factory=list)  # the server's own total per request

    @property
    def images_per_s(self) -> float:
        return len(self.latencies) / self.wall


@dataclass
class OriginalModel:
    """The model as the one-file script loaded it: transformers' own classes and forwards, none of ours."""

    model: Any
    processor: Any
    device: torch.device


def load_original(path: Path, device: torch.device, dtype: torch.dtype) -> OriginalModel:
    """``path`` loaded as the original script did (``from_pretrained`` in ``dtype``, nothing installed)."""
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()  # type: ignore[arg-type]
    return OriginalModel(model, AutoProcessor.from_pretrained(path), device)


def original_script(original: OriginalModel, image: bytes) -> dict[str, np.ndarray]:
    """What the one-file script did per image: hooks on the tower, the full forward, lm_head included."""
    model, processor = original.model, original.processor
    captured: dict[str, torch.Tensor] = {}
    visual = model.model.visual
    hooks = [
        visual.merger.register_forward_hook(lambda _m, _a, out: captured.__setitem__("projected", out)),
        visual.blocks[-1].register_forward_hook(lambda _m, _a, out: captured.__setitem__("vision", out)),
    ]
    try:
        picture = Image.open(io.BytesIO(image)).convert("RGB")
        content = [{"type": "image"}, {"type": "text", "text": PROMPT}]
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        inputs = processor(text=[text], images=[picture], return_tensors="pt").to(original.device)
        with torch.no_grad():
            out = model(**inputs, use_cache=False, output_hidden_states=True)
        last = out.hidden_states[-1]
        return {
            "vision_pooled_mean": captured["vision"].float().mean(0).cpu().numpy(),
            "projected_pooled_mean": captured["projected"].float().mean(0).cpu().numpy(),
            "lm_pooled_mean": last[0].float().mean(0).cpu().numpy(),
            "lm_last_token": last[0, -1].float().cpu().numpy(),
        }
    finally:
        for hook in hooks:
            hook.remove()


def timed_sequential(name: str, images: Sequence[bytes], run: Callable[[bytes], Any], device: torch.device) -> Row:
    latencies = []
    started = time.perf_counter()
    for image in images:
        t0 = time.perf_counter()
        run(image)
        sync(device)
        latencies.append(time.perf_counter() - t0)
    return Row(name, latencies, time.perf_counter() - started)


def timed_clients(
    name: str, client: EmbeddingClient, images: Sequence[bytes], concurrency: int, outputs: list[str]
) -> Row:
    """``concurrency`` threads share one channel and take images from a common list."""
    latencies: list[float] = []
    server_ms: list[float] = []
    lock = threading.Lock()

    def call(index: int) -> None:
        t0 = time.perf_counter()
        result = client.extract(images[index], prompt=PROMPT, outputs=outputs)
        with lock:
            latencies.append(time.perf_counter() - t0)
            if result.timings is not None:
                server_ms.append(result.timings.total_ms)

    wall = concurrently(len(images), concurrency, call)
    return Row(name, latencies, wall, server_ms)


BASELINE = "baseline (original script)"
IN_PROCESS = "in-process core, pooled"


def sequential_pass(original: OriginalModel, images: Sequence[bytes]) -> Callable[[], Row]:
    """One pass of the original script's method over ``images``, one image at a time (warmed up once)."""

    def baseline(image: bytes) -> Any:
        return original_script(original, image)

    for image in images[:2]:
        baseline(image)
    return lambda: timed_sequential(BASELINE, images, baseline, original.device)


class BaselineChild:
    """The baseline in a child process under ``args.baseline_mkl_dispatch``: one pass per :meth:`run`.

    The child loads the original model once and answers each line on its stdin with one pass's
    figures (a JSON line), so that its passes can alternate with the other rows'.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        command = module_command(__spec__.name, "--baseline-child", "--shape", args.shape, "--device", args.device)
        command += ["--dtype", args.dtype, "--images", str(args.images), "--size", str(args.size)]
        environment = {**os.environ, mkl_dispatch.ENV: args.baseline_mkl_dispatch}
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environment, cwd=ROOT
        )
        self._read()  # loaded and warmed up

    def run(self) -> Row:
        assert self._process.stdin is not None
        self._process.stdin.write("run\n")
        self._process.stdin.flush()
        figures = self._read()
        return Row(BASELINE, figures["latencies"], figures["wall"])

    def _read(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the baseline's process exited with {self._process.wait()} (its stderr is above)")
        figures: dict[str, Any] = json.loads(line)
        return figures

    def close(self) -> None:
        assert self._process.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # a child that already exited
            self._process.stdin.close()
        self._process.wait(timeout=60)


def serve_baseline_child(original: OriginalModel, images: Sequence[bytes]) -> None:
    """The child's side of :class:`BaselineChild`: a JSON line when ready, then one per pass asked for."""
    channel, sys.stdout = sys.stdout, sys.stderr  # whatever else prints stays off the figures' channel
    one_pass = sequential_pass(original, images)
    channel.write(json.dumps({"ready": True}) + "\n")
    channel.flush()
    for _ in sys.stdin:
        row = one_pass()
        channel.write(json.dumps({"latencies": row.latencies, "wall": row.wall}) + "\n")
        channel.flush()


def in_process_call(loaded: LoadedModel, images: Sequence[bytes]) -> Callable[[bytes], Any]:
    """The extraction core on ``loaded`` for one image, pooled outputs (warmed up)."""
    extractor = Extractor(loaded)
    pooled_plan = extractor.plan(OUTPUT_SETS["pooled"])

    def in_process(image: bytes) -> Any:
        return extractor.extract([decode_image(image)], PROMPT, pooled_plan)

    for warm in images[:2]:
        in_process(warm)
    return in_process


@dataclass
class Measured:
    """One row's passes, each from its own round."""

    name: str
    passes: list[Row]

    @property
    def images_per_s(self) -> float:
        return statistics.median(row.images_per_s for row in self.passes)

    def ratio(self, baseline: Measured) -> float:
        """Median over rounds of this row's images/s over the baseline's in the same round."""
        return statistics.median(
            row.images_per_s / base.images_per_s for row, base in zip(self.passes, baseline.passes, strict=True)
        )

    @property
    def latencies(self) -> list[float]:
        return [latency for row in self.passes for latency in row.latencies]

    @property
    def server_ms(self) -> list[float]:
        return [ms for row in self.passes for ms in row.server_ms]

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000


def interleaved_overhead(
    in_process: Callable[[bytes], Any], client: EmbeddingClient, images: Sequence[bytes], device: torch.device
) -> float:
    """RPC overhead at concurrency 1: the median, over images, of service / in-process latency - 1.

    The two calls alternate image by image, with a pause before each, so that drift in the
    machine's speed and the other side's idle threads affect both alike.
    """
    ratios = []
    for image in images:
        time.sleep(0.2)
        started = time.perf_counter()
        in_process(image)
        sync(device)
        local = time.perf_counter() - started
        time.sleep(0.2)
        started = time.perf_counter()
        client.extract(image, prompt=PROMPT, outputs=OUTPUT_SETS["pooled"])
        ratios.append((time.perf_counter() - started) / local)
    return statistics.median(ratios) - 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The table's settings (``bench.gpu.throughput_7b`` takes them too, with its own defaults)."""
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--images", type=int, default=16, help="distinct 448x448 images per row")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds: every row once per round")
    parser.add_argument("--quick", action="store_true", help="few images, one round, no transfer figure: a smoke run")
    parser.add_argument(
        "--fp32-matmul", choices=FP32_MATMULS, default=DEFAULT_FP32_MATMUL, help="the core's and the service's"
    )
    parser.add_argument(
        "--baseline-mkl-dispatch",
        choices=mkl_dispatch.MODES,
        default="vendor",
        help="on the CPU, the baseline's process: MKL's own choice (the original script's) or ours",
    )
    parser.add_argument("--baseline-child", action="store_true", help=argparse.SUPPRESS)


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``argv`` parsed, ``--quick`` applied: 3 images, concurrency 1 and 2, one round."""
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.concurrency, args.rounds = 3, [1, 2], 1
    return args


@dataclass
class Throughput:
    """One run's rows (the baseline first), the RPC overhead, and the transfer figure (not with --quick)."""

    rows: list[Measured]
    overhead: float
    transfer: TransferResult | None


def measure(args: argparse.Namespace) -> Throughput:
    """Every row in ``args.rounds`` alternating rounds, then the RPC overhead and the transfer figure."""
    dtype = getattr(torch, args.dtype)
    path = checkpoint(dtype, shape=args.shape, device=args.device)
    images = [noise_png(args.size, args.size, seed) for seed in range(args.images)]
    options = LoadOptions(model=str(path), device=args.device, dtype=args.dtype, fp32_matmul=args.fp32_matmul)
    loaded = load_model(options)
    in_process = in_process_call(loaded, images)
    sides: dict[str, Callable[[], Row]] = {}
    child = None
    if loaded.device.type == "cpu":  # MKL's kernel choice is the process's: the baseline gets its own
        child = BaselineChild(args)
        sides[BASELINE] = child.run
    else:  # elsewhere MKL runs nothing of the model: the baseline shares this process
        sides[BASELINE] = sequential_pass(load_original(path, loaded.device, dtype), images)
    sides[IN_PROCESS] = lambda: timed_sequential(IN_PROCESS, images, in_process, loaded.device)
    serve_args = ["--model", str(path), "--device", args.device, "--dtype", args.dtype]
    serve_args += ["--fp32-matmul", args.fp32_matmul]
    try:
        with ServerProcess(serve_args) as server, EmbeddingClient(server.address) as client:
            for outputs in OUTPUT_SETS.values():  # warm the server up on every output set
                for warm in images[:3]:
                    client.extract(warm, outputs=outputs)
            for outputs_name, outputs in OUTPUT_SETS.items():
                for concurrency in args.concurrency:
                    name = f"service c={concurrency}, {outputs_name}"
                    sides[name] = partial(timed_clients, name, client, images, concurrency, outputs)
            rows = [Measured(name, passes) for name, passes in alternating(sides, args.rounds).items()]
            overhead = interleaved_overhead(in_process, client, images, loaded.device)
    finally:
        if child is not None:
            child.close()
    return Throughput(rows, overhead, None if args.quick else measure_transfer())


def report(result: Throughput, args: argparse.Namespace) -> None:
    rows, overhead = result.rows, result.overhead
    baseline = rows[0]
    print(f"\n{args.images} images of {args.size}x{args.size}, model '{args.shape}' on {args.device} ({args.dtype})")
    if args.device == "cpu":
        print(
            f"MKL dispatch: the baseline's process {args.baseline_mkl_dispatch}; this process and the server's: "
            f"{mkl_dispatch.state().reason}"
        )
    print(f"{args.rounds} alternating round(s); images/s: median over rounds; vs base: median of each round's ratio")
    print(f"{'':38} {'img/s':>8} {'vs base':>8} {'p50 ms':>9} {'p99 ms':>9}")
    for row in rows:
        ratio = row.ratio(baseline)
        print(
            f"{row.name:38} {row.images_per_s:8.2f} {ratio:7.2f}x {row.percentile(50):9.1f} {row.percentile(99):9.1f}"
        )
    first, service, in_process, outside = _overhead_parts(result, args)
    print(
        f"\nRPC overhead at concurrency 1, pooled (interleaved pairs, median): {overhead * 100:+.1f} % "
        f"of the in-process latency"
    )
    print(f"  the rows above, p50: service c={first} {service * 1000:.0f} ms, in-process {in_process * 1000:.0f} ms")
    if outside is not None:
        print(f"  time outside the server's own processing (network, codec, client): {outside:+.1f} ms")
    if result.transfer is not None:
        transfer = result.transfer
        print(
            f"tensor transfer, gRPC loopback -> numpy: {transfer.grpc_mb_s['encoded']:.0f} MB/s "
            f"(protobuf messages built the usual way: {transfer.grpc_mb_s['messages']:.0f} MB/s; "
            f"a memory copy of the same {transfer.megabytes:.0f} MB: {transfer.copy_mb_s:.0f} MB/s)"
        )


def _overhead_parts(result: Throughput, args: argparse.Namespace) -> tuple[int, float, float, float | None]:
    """The first concurrency, its pooled service row's and the in-process row's median latency (s), and
    the service's median ms outside the server's own processing (None where the server sent no timings)."""
    by_name = {row.name: row for row in result.rows}
    first = args.concurrency[0]
    service_row = by_name[f"service c={first}, pooled"]
    service = statistics.median(service_row.latencies)
    in_process = statistics.median(by_name[IN_PROCESS].latencies)
    outside = service * 1000 - statistics.median(service_row.server_ms) if service_row.server_ms else None
    return first, service, in_process, outside


def table(result: Throughput) -> list[dict[str, Any]]:
    """The rows as :meth:`Benchmark.write` takes them."""
    baseline = result.rows[0]
    return [
        {
            "row": row.name,
            "images/s": row.images_per_s,
            "vs baseline": row.ratio(baseline),
            "p50 ms": row.percentile(50),
            "p99 ms": row.percentile(99),
        }
        for row in result.rows
    ]


def summary(result: Throughput, args: argparse.Namespace) -> dict[str, Any]:
    """The figures beside the table: RPC overhead, and the transfer rates where measured."""
    first, service, in_process, outside = _overhead_parts(result, args)
    found: dict[str, Any] = {
        "RPC overhead at concurrency 1, pooled, % of the in-process latency": result.overhead * 100,
        f"p50 ms, service c={first} pooled": service * 1000,
        "p50 ms, in-process": in_process * 1000,
        "ms outside the server's own processing (network, codec, client)": outside,
    }
    if result.transfer is not None:
        found["tensor transfer, gRPC loopback -> numpy, MB/s"] = result.transfer.grpc_mb_s["encoded"]
        found["the same as protobuf messages built the usual way, MB/s"] = result.transfer.grpc_mb_s["messages"]
        found["a memory copy of the same bytes, MB/s"] = result.transfer.copy_mb_s
    return found


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings, as parsed (``--quick`` applied)."""
    return {key: value for key, value in vars(args).items() if key not in ("command", "output", "baseline_child")}


def main(argv: Sequence[str] | None = None) -> Throughput | None:
    parser = BENCH.parser(argv)
    add_arguments(parser)
    args = parse(parser, argv)
    if args.baseline_child:
        dtype = getattr(torch, args.dtype)
        path = checkpoint(dtype, shape=args.shape, device=args.device)
        images = [noise_png(args.size, args.size, seed) for seed in range(args.images)]
        serve_baseline_child(load_original(path, resolve_device(args.device), dtype), images)
        return None
    result = measure(args)
    report(result, args)
    BENCH.write(args, table(result), summary=summary(result, args), details=settings(args), device=args.device)
    return result


if __name__ == "__main__":
    main()
