"""The GPU benchmark: the Qwen2.5-VL-7B architecture (random weights, bf16, built on the GPU).

Prints the same table as ``bench.throughput.vs_original`` (baseline = the original script's method,
the core, the service at concurrency 1/4/16 for pooled / full / vision-only outputs), then the
language model's achieved TFLOP/s in a batched forward against the card's bf16 dense peak. No
download: the checkpoint is built on the device with random weights and cached on disk.

    python -m bench.gpu.throughput_7b                   # on a GPU machine
    python -m bench.gpu.throughput_7b --shape tiny --device cpu --dtype float32 --quick   # smoke test
"""

from __future__ import annotations

import qwen25vl_embed_server  # noqa: F401  (first: it sets MKL's dispatch before torch loads)

# isort: split
import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.common import PROMPT, Benchmark, checkpoint, noise_png, sync
from bench.throughput import vs_original
from qwen25vl_embed_server.core.model.extractor import Extractor, Prepared
from qwen25vl_embed_server.core.model.image_decoding import decode_image
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model

BENCH = Benchmark(__spec__.name, __doc__)

# bf16 dense tensor-core peaks (TFLOP/s), by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
}


def peak_tflops(device: str, override: float | None) -> float | None:
    if override is not None:
        return override
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def lm_tflops(path: Path, args: argparse.Namespace, batch: int) -> tuple[float, float]:
    """Achieved TFLOP/s of the language model: (full - vision-only) time of a batch of requests.

    FLOPs counted: 2 x (LM parameters, lm_head excluded since it never runs) x tokens, plus the
    attention score and value products (4 x layers x T^2 x D per sequence).
    """
    loaded = load_model(LoadOptions(model=str(path), device=args.device, dtype=args.dtype))
    extractor = Extractor(loaded)
    image = decode_image(noise_png(args.size, args.size, 0))
    full = [extractor.prepare([image], PROMPT, extractor.plan(["lm_last_hidden"]))] * batch
    vision = [extractor.prepare([image], PROMPT, extractor.plan(["projected_tokens"]))] * batch

    def seconds(items: list[Prepared], repeats: int = 3) -> float:
        extractor.run(items)
        sync(loaded.device)
        started = time.perf_counter()
        for _ in range(repeats):
            extractor.run(items)
        sync(loaded.device)
        return (time.perf_counter() - started) / repeats

    lm_seconds = max(seconds(full) - seconds(vision), 1e-9)
    lm = loaded.language_model
    params = sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel()
    config = loaded.model.config.text_config
    tokens = full[0].sequence_length
    flops = batch * (2 * params * tokens + 4 * config.num_hidden_layers * tokens**2 * config.hidden_size)
    return flops / lm_seconds / 1e12, lm_seconds


def main(argv: Sequence[str] | None = None) -> None:
    parser = BENCH.parser(argv)
    vs_original.add_arguments(parser)
    parser.set_defaults(shape="7b", device="cuda", dtype="bfloat16", images=32)
    parser.add_argument("--batch", type=int, default=8, help="requests per forward for the TFLOP/s figure")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's bf16 dense peak")
    args = vs_original.parse(parser, argv)
    result = vs_original.measure(args)
    vs_original.report(result, args)
    path = checkpoint(args.dtype, shape=args.shape, device=args.device)
    batch = 2 if args.quick else args.batch
    achieved, seconds = lm_tflops(path, args, batch)
    peak = peak_tflops(args.device, args.peak_tflops)
    share = f" = {achieved / peak * 100:.1f} % of the {peak:.0f} TFLOP/s bf16 peak" if peak else ""
    print(
        f"language model, batch of {batch} at {args.size}x{args.size}: {seconds * 1000:.1f} ms, "
        f"{achieved:.2f} TFLOP/s{share}"
    )
    summary = vs_original.summary(result, args)
    summary[f"language model, batch of {batch}: ms per forward"] = seconds * 1000
    summary["language model: TFLOP/s"] = achieved
    summary["language model: % of the bf16 dense peak"] = achieved / peak * 100 if peak else None
    details = {**vs_original.settings(args), "batch": batch, "peak_tflops": peak}
    BENCH.write(args, vs_original.table(result), summary=summary, details=details, device=args.device)


if __name__ == "__main__":
    main()
