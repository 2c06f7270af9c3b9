"""Our bit-identical forwards of the vision tower against transformers', the model alone, alternating.

    python -m bench.cpu.exact_forwards                          # both levers, fp32 and bf16, 4 images 448x448
    python -m bench.cpu.exact_forwards --lever patch-embedding  # one lever: the others stay ours on both
    python -m bench.cpu.exact_forwards --sizes mixed            # 4 images of different sizes and aspects

Two copies of the 'bench' random-weight checkpoint on the CPU, loaded as the server loads them
(bf16 in torch's bf16 kernels, ``--bf16-arithmetic native``, on both sides):
``ours`` (every forward of ours installed) and ``transformers`` (the same load, the chosen levers'
modules given back transformers' forward). Levers: ``vision-attention``
(``core/cpu/vision_attention.py``) and ``patch-embedding`` (``core/cpu/patch_embedding.py``). Each round runs
the batch once on each, the order alternating. Prints ms per image (median over rounds), the ratio,
and whether every capture point is equal. ``--vision-only`` asks for vision outputs only, so the
language model does not run.
"""

from __future__ import annotations

import qwen25vl_embed_server  # noqa: F401  (first: it sets MKL's dispatch before torch loads)

# isort: split

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bench.common import Benchmark, alternating_ms, checkpoint, noise_images, prepared_batches
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model

BENCH = Benchmark(__spec__.name, __doc__)
SIZES = {"uniform": [(448, 448)] * 4, "mixed": [(448, 448), (300, 700), (1000, 250), (640, 480)]}
OUTPUTS = ["vision_tokens", "projected_tokens", "lm_last_hidden"]


def _stock_attention(visual: Any) -> None:
    for block in visual.blocks:
        vars(block.attn).pop("forward", None)  # transformers' class forward again


def _stock_patch_embedding(visual: Any) -> None:
    vars(visual.patch_embed).pop("forward", None)


LEVERS: dict[str, Callable[[Any], None]] = {
    "vision-attention": _stock_attention,
    "patch-embedding": _stock_patch_embedding,
}


def variants(dtype: str, levers: Sequence[str], path: str | None = None) -> dict[str, Extractor]:
    """``ours`` and ``transformers`` (``levers`` given back transformers' forward) on ``path``
    (None: the 'bench' checkpoint), in ``dtype``."""
    path = path or str(checkpoint(dtype))
    # bf16 in torch's own bf16 kernels on both sides, on every CPU: where "auto" would choose the
    # float32 arithmetic (no bf16 dot products), ours would attend in float32 and transformers'
    # forward in bf16, and the bits would differ by that arithmetic, not by the lever.
    options = LoadOptions(model=path, device="cpu", dtype=dtype, bf16_arithmetic="native")
    ours = Extractor(load_model(options))
    theirs = Extractor(load_model(options))
    for lever in levers:
        LEVERS[lever](theirs.loaded.visual)
    return {"transformers": theirs, "ours": ours}


def main(argv: Sequence[str] | None = None) -> None:
    parser = BENCH.parser(argv)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument(
        "--lever", nargs="+", choices=LEVERS, default=list(LEVERS), help="what the `transformers` side runs as stock"
    )
    parser.add_argument("--sizes", choices=SIZES, default="uniform")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--vision-only", action="store_true", help="the vision tower alone (no LM output asked)")
    args = parser.parse_args(argv)
    images = noise_images(SIZES[args.sizes])
    outputs = OUTPUTS[:2] if args.vision_only else OUTPUTS
    rows = []
    for dtype in args.dtypes:
        extractors = variants(dtype, args.lever)
        batches = prepared_batches(extractors, images, outputs)
        results = {name: e.run(batches[name]) for name, e in extractors.items()}  # also the warm-up
        equal = all(
            np.array_equal(a.tensors[key], b.tensors[key])
            for a, b in zip(results["ours"], results["transformers"], strict=True)
            for key in outputs
        )
        times = alternating_ms(extractors, batches, args.rounds)
        base = statistics.median(times["transformers"])
        for name, values in times.items():
            ms = statistics.median(values)
            print(f"{dtype:9} {args.sizes:8} {name:13} {ms:7.1f} ms/image  x{base / ms:4.2f}", flush=True)
            rows.append(
                {
                    "dtype": dtype,
                    "sizes": args.sizes,
                    "forwards": name,
                    "ms/image": ms,
                    "vs transformers": base / ms,
                    "every capture point equal": equal,
                }
            )
        print(f"{dtype:9} {args.sizes:8} every capture point equal: {equal}", flush=True)
    BENCH.write(args, rows, details={"levers": args.lever, "rounds": args.rounds, "outputs": outputs})


if __name__ == "__main__":
    main()
