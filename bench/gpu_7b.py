"""The GPU benchmark: the Qwen2.5-VL-7B architecture (random weights, bf16, built on the GPU).

Prints the same table as ``throughput.py`` (baseline = the original script's method, the core, the
service at concurrency 1/4/16 for pooled / full / vision-only outputs), then the language model's
achieved TFLOP/s in a batched forward against the card's bf16 dense peak. No download: the
checkpoint is built on the device with random weights and cached on disk.

    python bench/gpu_7b.py                                  # on a GPU machine
    python bench/gpu_7b.py --shape tiny --device cpu --dtype float32 --quick   # smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import throughput

from qwen25vl_embed_server.core.extractor import Extractor
from qwen25vl_embed_server.core.image_decoding import decode_image
from qwen25vl_embed_server.core.loading import LoadOptions, load_model

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
    image = decode_image(throughput.noise_png(args.size, 0))
    full = [extractor.prepare([image], throughput.PROMPT, extractor.plan(["lm_last_hidden"]))] * batch
    vision = [extractor.prepare([image], throughput.PROMPT, extractor.plan(["projected_tokens"]))] * batch

    def seconds(items: list, repeats: int = 3) -> float:  # type: ignore[type-arg]
        extractor.run(items)
        throughput.sync(loaded.device)
        started = time.perf_counter()
        for _ in range(repeats):
            extractor.run(items)
        throughput.sync(loaded.device)
        return (time.perf_counter() - started) / repeats

    lm_seconds = max(seconds(full) - seconds(vision), 1e-9)
    lm = loaded.language_model
    params = sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel()
    config = loaded.model.config.text_config
    tokens = full[0].sequence_length
    flops = batch * (2 * params * tokens + 4 * config.num_hidden_layers * tokens**2 * config.hidden_size)
    return flops / lm_seconds / 1e12, lm_seconds


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="7b", choices=sorted(throughput.SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--batch", type=int, default=8, help="requests per forward for the TFLOP/s figure")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's bf16 dense peak")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    table_args = [
        "--shape",
        args.shape,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--images",
        str(args.images),
        "--size",
        str(args.size),
    ] + (["--quick"] if args.quick else [])
    throughput.main(table_args)
    path = throughput.checkpoint(args.shape, args.device, getattr(torch, args.dtype))
    batch = 2 if args.quick else args.batch
    achieved, seconds = lm_tflops(path, args, batch)
    peak = peak_tflops(args.device, args.peak_tflops)
    share = f" = {achieved / peak * 100:.1f} % of the {peak:.0f} TFLOP/s bf16 peak" if peak else ""
    print(
        f"language model, batch of {batch} at {args.size}x{args.size}: {seconds * 1000:.1f} ms, "
        f"{achieved:.2f} TFLOP/s{share}"
    )


if __name__ == "__main__":
    main()
