"""How close the model phase is to what this CPU's matmuls allow: a floor under any implementation.

    python -m bench.cpu.roofline                           # fp32 and bf16, four 448x448 images in a batch
    python -m bench.cpu.roofline --peer-images-per-s 3.85  # also: what being 1.25x that peer would take
    python -m bench.cpu.roofline --sizes mixed --dtypes float32

One forward of a random-weight checkpoint ('bench' unless ``--shape``), loaded as the server loads
it, records every linear layer's call (rows, in, out, bias) and every attention call (the (query,
key) pairs it must compute, and its head size). Then, on the same CPU and threads:

- **Linear floor.** Each recorded matmul is timed alone at its own shape, with fresh tensors, on
  the faster of torch's path (MKL in fp32, oneDNN in bf16) and oneDNN with the weight prepacked
  (what vLLM's CPU backend and inductor's freezing run). Calls that read the same input (q, k and v;
  gate and up) are also timed as one fused matmul, and the faster of fused and separate counts.
- **Attention floor.** The attention FLOPs, counting only the (query, key) pairs a call has to
  compute (the causal triangle, a mask's allowed pairs: no padding), at the best rate any of the
  model's matmuls reached (generous: attention's own kernels also do a softmax).
- Everything else (norms, rotary embeddings, activations, residual adds, the patch embedding,
  copies) counts as free.

A second floor holds for any implementation that keeps transformers' bits, as the exact path
does: the time one forward of the model spends inside the kernels whose summation order fixes
those bits (:data:`PINNED_KERNELS`: the matmuls as MKL or oneDNN runs them, the attention kernel,
the patch embedding's convolution), as torch's profiler counts their own time. Another kernel for
any of them sums in another order and gives other bits, so an exact implementation can only win
time on the rest (norms, rotary embeddings, activations, residual adds, casts, copies), which the
script prints beside it.

The sum is the time per image below which no implementation that computes these products on this
CPU can go, whatever its kernels. It prints the range of rates the matmuls ran at, the model's own
time (median over ``--rounds``), the floor and their ratio, and the exact floor. With
``--peer-images-per-s``, it prints the time per image that being ``--target`` times that peer's rate
would take, against both floors, and what each leaves for everything else.
The server's images/s add preprocessing and transport (about 5 % of a request's CPU time here) to
the model's time.
"""

from __future__ import annotations

import qwen25vl_embed_server  # noqa: F401  (first: it sets MKL's dispatch before torch loads)

# isort: split

import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from bench.common import PROMPT, Benchmark, checkpoint, noise_images
from bench.cpu.exact_forwards import OUTPUTS, SIZES
from qwen25vl_embed_server.core.cpu.packed_linear import PackedLinear
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model

BENCH = Benchmark(__spec__.name, __doc__)


@dataclass(frozen=True)
class Matmul:
    """One linear layer's call: ``rows`` x ``inputs`` times ``inputs`` x ``outputs``."""

    rows: int
    inputs: int
    outputs: int
    bias: bool

    @property
    def flops(self) -> int:
        return 2 * self.rows * self.inputs * self.outputs


@dataclass(frozen=True)
class Attention:
    """One attention call: the (query, key) pairs it attends, over all its heads, of ``head_dim``."""

    pairs: int
    head_dim: int

    @property
    def flops(self) -> int:
        return 4 * self.pairs * self.head_dim  # q k^T, then p v


def attended_pairs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> int:
    """The pairs a call computes where it has to: a mask's or the causal triangle's, padding excluded."""
    *lead, queries, _ = query.shape
    keys = key.shape[-2]
    heads = int(np.prod(lead))
    if mask is not None:
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min
        return int(allowed.expand(*lead, queries, keys).sum())
    if causal:  # torch's is_causal: query i sees keys 0..i
        return heads * sum(min(i + 1, keys) for i in range(queries))
    return heads * queries * keys


class _AttentionCalls(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    """Records the scaled-dot-product attention calls that reach an ATen kernel."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.calls: list[Attention] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if "scaled_dot_product" in func.__name__:
            schema = [argument.name for argument in func._schema.arguments]
            bound = dict(zip(schema, args, strict=False)) | kwargs
            query, key = bound["query"], bound["key"]
            pairs = attended_pairs(query, key, bound.get("attn_mask"), bool(bound.get("is_causal", False)))
            self.calls.append(Attention(pairs, query.shape[-1]))
        return func(*args, **kwargs)


def record(extractor: Extractor, batch: list[Any]) -> tuple[list[list[Matmul]], list[Attention]]:
    """One forward: the linear calls, grouped by the input they read, and the attention calls."""
    groups: list[list[Matmul]] = []
    last_input: list[torch.Tensor] = []  # held, so that a new input can't take its id

    def hook(module: Any, args: tuple[torch.Tensor, ...], _output: Any) -> None:
        x = args[0]
        call = Matmul(x.numel() // x.shape[-1], module.in_features, module.out_features, module.bias is not None)
        if last_input and x is last_input[0]:  # q, k and v; gate and up: consecutive calls on one input
            groups[-1].append(call)
        else:
            groups.append([call])
            last_input[:] = [x]

    linears = [m for m in extractor.loaded.model.modules() if isinstance(m, nn.Linear | PackedLinear)]
    handles = [m.register_forward_hook(hook) for m in linears]
    try:
        with _AttentionCalls() as attention:
            extractor.run(batch)
    finally:
        for handle in handles:
            handle.remove()
    return groups, attention.calls


# The kernels whose summation order fixes transformers' bits, as they run in the exact path: the
# linear layers (MKL's sgemm in fp32, with addmm's bias; oneDNN's in bf16, packed or not), the
# attention kernel, the patch embedding's convolution. Their self time only: addmm's copy of the
# bias into its output is counted with the rest, which keeps this floor on the low side.
PINNED_KERNELS = frozenset(
    {
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "mkldnn::_linear_pointwise",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::mkldnn_convolution",
    }
)


def pinned_kernels(extractor: Extractor, batch: list[Any]) -> tuple[float, int]:
    """The share of one forward of ``batch``'s wall time spent inside :data:`PINNED_KERNELS` (their
    self time, as torch's profiler counts it), and how many calls of them it made.

    A share, applied to the model's time measured without the profiler, so that the machine's drift
    between the profiled forward and the timed ones does not enter the floor.
    """
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        started = time.perf_counter()
        extractor.run(batch)
        wall = time.perf_counter() - started
    events = [event for event in profiled.key_averages() if event.key in PINNED_KERNELS]
    seconds = sum(event.self_cpu_time_total for event in events) / 1e6
    return seconds / wall, sum(event.count for event in events)


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def fastest_seconds(call: Matmul, dtype: torch.dtype, repeats: int) -> float:
    """The faster of torch's linear and oneDNN's prepacked linear for one call's shape."""
    x = torch.randn(call.rows, call.inputs).to(dtype)
    weight = torch.randn(call.outputs, call.inputs).to(dtype)
    bias = torch.randn(call.outputs).to(dtype) if call.bias else None
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
    stock = _median_seconds(lambda: functional.linear(x, weight, bias), repeats)
    onednn = _median_seconds(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], ""), repeats)
    return min(stock, onednn)


def linear_floor(groups: list[list[Matmul]], dtype: torch.dtype, repeats: int) -> tuple[float, list[float]]:
    """Seconds for all the linear calls at their fastest (fused where faster), and every FLOP/s timed."""
    total, rates = 0.0, []
    for group, count in Counter(tuple(group) for group in groups).items():
        separate = 0.0
        for call in group:
            seconds = fastest_seconds(call, dtype, repeats)
            separate += seconds
            rates.append(call.flops / seconds)
        if len(group) > 1:
            first = group[0]
            fused = Matmul(first.rows, first.inputs, sum(c.outputs for c in group), any(c.bias for c in group))
            fused_seconds = fastest_seconds(fused, dtype, repeats)
            rates.append(fused.flops / fused_seconds)
            separate = min(separate, fused_seconds)
        total += count * separate
    return total, rates


@dataclass(frozen=True)
class Report:
    """One dtype's figures, per image."""

    model_ms: float
    linear_gflop: float
    linear_ms: float
    attention_gflop: float
    attention_ms: float
    slowest_gflops: float
    best_gflops: float
    pinned_ms: float

    @property
    def floor_ms(self) -> float:
        return self.linear_ms + self.attention_ms


def measure(shape: str, name: str, images: list[Image.Image], rounds: int, repeats: int) -> Report:
    dtype = getattr(torch, name)
    path = str(checkpoint(dtype, shape=shape))
    extractor = Extractor(load_model(LoadOptions(model=path, device="cpu", dtype=name)))
    plan = extractor.plan(OUTPUTS)
    batch = [extractor.prepare([image], PROMPT, plan) for image in images]
    groups, attention = record(extractor, batch)  # also the warm-up
    model_ms = []
    for _ in range(rounds):
        started = time.perf_counter()
        extractor.run(batch)
        model_ms.append((time.perf_counter() - started) * 1e3)
    pinned_share = statistics.median(pinned_kernels(extractor, batch)[0] for _ in range(3))
    linear_s, rates = linear_floor(groups, dtype, repeats)
    attention_flops = sum(call.flops for call in attention)
    n = len(images)
    model_per_image = statistics.median(model_ms) / n
    return Report(
        model_ms=model_per_image,
        linear_gflop=sum(call.flops for group in groups for call in group) / n / 1e9,
        linear_ms=linear_s * 1e3 / n,
        attention_gflop=attention_flops / n / 1e9,
        attention_ms=attention_flops / max(rates) * 1e3 / n,
        slowest_gflops=min(rates) / 1e9,
        best_gflops=max(rates) / 1e9,
        pinned_ms=pinned_share * model_per_image,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = BENCH.parser(argv)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--shape", choices=["tiny", "bench"], default="bench", help="the random-weight checkpoint")
    parser.add_argument("--sizes", choices=SIZES, default="uniform")
    parser.add_argument("--rounds", type=int, default=8, help="timed forwards of the model")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls of each matmul")
    parser.add_argument("--peer-images-per-s", type=float, nargs="*", default=[], help="one per dtype")
    parser.add_argument("--target", type=float, default=1.25, help="the ratio to the peer asked for")
    args = parser.parse_args(argv)
    images = noise_images(SIZES[args.sizes])
    rows = []
    for index, name in enumerate(args.dtypes):
        report = measure(args.shape, name, images, args.rounds, args.repeats)
        row = {
            "dtype": name,
            "sizes": args.sizes,
            "model ms/image": report.model_ms,
            "floor ms/image": report.floor_ms,
            "model / floor": report.model_ms / report.floor_ms,
            "linear GFLOP/image": report.linear_gflop,
            "linear floor ms": report.linear_ms,
            "attention GFLOP/image": report.attention_gflop,
            "attention floor ms": report.attention_ms,
            "matmul GFLOP/s": f"{report.slowest_gflops:.0f}-{report.best_gflops:.0f}",
            "pinned kernels ms/image": report.pinned_ms,
        }
        rows.append(row)
        label = f"{name:9} {args.sizes:8}"
        print(
            f"{label} linear layers {report.linear_gflop:5.2f} GFLOP/image, floor {report.linear_ms:6.1f} ms/image"
            f" (matmuls at {report.slowest_gflops:.0f}-{report.best_gflops:.0f} GFLOP/s);"
            f" attention {report.attention_gflop:4.2f} GFLOP/image, floor {report.attention_ms:5.1f} ms/image",
            flush=True,
        )
        print(
            f"{label} the model {report.model_ms:6.1f} ms/image; floor {report.floor_ms:6.1f} ms/image;"
            f" model / floor x{report.model_ms / report.floor_ms:4.2f}",
            flush=True,
        )
        rest_ms = report.model_ms - report.pinned_ms
        print(
            f"{label} at transformers' bits: the pinned kernels (matmuls, attention, patch convolution)"
            f" {report.pinned_ms / report.model_ms:4.0%} of the model's time, {report.pinned_ms:6.1f} ms/image;"
            f" the rest {rest_ms:5.1f} ms/image",
            flush=True,
        )
        if index < len(args.peer_images_per_s):
            peer = args.peer_images_per_s[index]
            needed = 1e3 / (args.target * peer)
            row[f"{args.target:g}x the peer, ms/image"] = needed
            verdict = "below the floor: no implementation reaches it" if needed < report.floor_ms else "above the floor"
            print(
                f"{label} {args.target:g}x a peer at {peer:g} images/s needs {needed:6.1f} ms/image in all: {verdict};"
                f" it leaves {needed - report.floor_ms:+6.1f} ms/image for everything but the products",
                flush=True,
            )
            left = needed - report.pinned_ms
            exact = (
                "below what the pinned kernels take alone: no exact implementation reaches it"
                if left <= 0
                else f"it leaves {left:5.1f} ms/image for everything else (the rest of the model, {rest_ms:.1f}"
                " ms/image now, and the server's preprocessing and transport)"
            )
            print(f"{label} at transformers' bits: {exact}", flush=True)
    BENCH.write(args, rows, details={"shape": args.shape, "rounds": args.rounds, "peers": args.peer_images_per_s})


if __name__ == "__main__":
    main()
