"""bf16 in float32 arithmetic against torch's bf16 kernels, the model alone, alternating rounds.

    python -m bench.cpu.bf16_arithmetic                  # 4 images 448x448, then 4 of mixed sizes
    python -m bench.cpu.bf16_arithmetic --sizes mixed --rounds 6
    python -m bench.cpu.bf16_arithmetic --vision-only    # the vision tower alone

The 'bench' random-weight checkpoint (its float32 weights) loaded three times on the CPU, as the
server loads it: ``bf16 native`` (``--bf16-arithmetic native``: torch's bf16 kernels, oneDNN-packed),
``bf16 float32`` (``--bf16-arithmetic float32``, ``core/cpu/bf16_arithmetic.py``) and ``fp32`` (the
default dtype, for reference). Each round runs the batch once on each, the order alternating.
Prints ms per image (median over rounds), each one's speed over ``bf16 native``, and each bf16
variant's largest error against fp32, relative to the capture point's largest magnitude: the two
must be of one size (bf16 rounding), or the faster arithmetic would cost accuracy.
"""

from __future__ import annotations

import qwen25vl_embed_server  # noqa: F401  (first: it sets MKL's dispatch before torch loads)

# isort: split

import statistics
from collections.abc import Sequence

import numpy as np
import torch

from bench.common import Benchmark, alternating_ms, checkpoint, noise_image, prepared_batches, relative_difference
from bench.cpu.exact_forwards import OUTPUTS, SIZES
from qwen25vl_embed_server.core.cpu.bf16_arithmetic import cpu_has_bf16_dot_products
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model

BENCH = Benchmark(__spec__.name, __doc__)
VARIANTS = {"bf16 native": ("bfloat16", "native"), "bf16 float32": ("bfloat16", "float32"), "fp32": ("float32", "auto")}


def main(argv: Sequence[str] | None = None) -> None:
    parser = BENCH.parser(argv)
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--vision-only", action="store_true", help="the vision tower alone (no LM output asked)")
    args = parser.parse_args(argv)
    path = str(checkpoint())
    extractors = {
        name: Extractor(load_model(LoadOptions(model=path, device="cpu", dtype=dtype, bf16_arithmetic=arithmetic)))
        for name, (dtype, arithmetic) in VARIANTS.items()
    }
    outputs = OUTPUTS[:2] if args.vision_only else OUTPUTS
    hardware = cpu_has_bf16_dot_products()
    print(f"{torch.get_num_threads()} threads; bf16 dot products in hardware: {hardware}")
    rows = []
    rng = np.random.default_rng(0)
    for sizes in args.sizes:
        images = [noise_image(w, h, rng) for w, h in SIZES[sizes]]
        batches = prepared_batches(extractors, images, outputs)
        results = {name: e.run(batches[name]) for name, e in extractors.items()}  # also the warm-up
        times = alternating_ms(extractors, batches, args.rounds)
        base = statistics.median(times["bf16 native"])
        errors = {
            name: {
                key: max(
                    relative_difference(ours.tensors[key], exact.tensors[key])
                    for ours, exact in zip(results[name], results["fp32"], strict=True)
                )
                for key in outputs
            }
            for name in ("bf16 native", "bf16 float32")
        }
        for name, values in times.items():
            ms = statistics.median(values)
            print(f"{sizes:8} {name:13} {ms:7.1f} ms/image  x{base / ms:4.2f}", flush=True)
            error = max(errors[name].values()) if name in errors else None
            rows.append(
                {"sizes": sizes, "variant": name, "ms/image": ms, "vs bf16 native": base / ms, "error vs fp32": error}
            )
        for name, by_output in errors.items():
            shown = "  ".join(f"{key} {error:.1e}" for key, error in by_output.items())
            print(f"{sizes:8} {name:13} error vs fp32: {shown}", flush=True)
    details = {"threads": torch.get_num_threads(), "bf16_dot_products": hardware, "outputs": outputs}
    BENCH.write(args, rows, details=details)


if __name__ == "__main__":
    main()
