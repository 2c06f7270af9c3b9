"""oneDNN-packed linear layers against torch's own, the model alone, in alternating rounds.

    python -m bench.cpu.packing                  # fp32 and bf16, a batch of 4 noise images 448x448
    python -m bench.cpu.packing --batch 1 --dtypes float32

Variants, each a separately loaded copy of the 'bench' random-weight checkpoint on the CPU:
``plain`` (torch's matmuls), ``packed`` (every linear layer packed, as ``--fp32-matmul onednn`` /
bf16 load them, patch embedding as the checkpoint has it) and, in fp32, ``packed+patch`` (also the
patch embedding as one packed matmul: what ``--fp32-matmul onednn`` loads). Prints ms per image
(median over rounds), the ratio to ``plain``, and the largest difference of ``lm_last_token``
relative to ``plain``'s (0 in bf16: the same sums).
"""

from __future__ import annotations

import qwen25vl_embed_server  # noqa: F401  (first: it sets MKL's dispatch before torch loads)

# isort: split

import dataclasses
import statistics
from collections.abc import Sequence

import torch

from bench.common import PROMPT, Benchmark, alternating_ms, checkpoint, noise_images, relative_difference
from qwen25vl_embed_server.core.cpu.packed_linear import pack_linears
from qwen25vl_embed_server.core.model.extractor import Extractor, Prepared
from qwen25vl_embed_server.core.model.loading import LoadOptions, load_model

BENCH = Benchmark(__spec__.name, __doc__)


def variants(dtype: str) -> dict[str, Extractor]:
    """Each variant's extractor, packed by hand from an unpacked load (fp32 loads unpacked)."""
    path = str(checkpoint(dtype))
    load = LoadOptions(model=path, device="cpu", dtype="float32")

    def unpacked() -> Extractor:
        loaded = load_model(load)
        if dtype == "bfloat16":  # a bf16 load is packed already: the same weights, loaded as fp32, cast
            loaded = dataclasses.replace(loaded, model=loaded.model.to(torch.bfloat16), dtype=torch.bfloat16)
        return Extractor(loaded)

    out = {"plain": unpacked(), "packed": unpacked()}
    pack_linears(out["packed"].loaded.model)
    if dtype == "float32":
        out["packed+patch"] = unpacked()
        pack_linears(out["packed+patch"].loaded.model, patch_embed=True)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = BENCH.parser(argv)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    images = noise_images([(448, 448)] * args.batch)
    rows = []
    for dtype in args.dtypes:
        extractors = variants(dtype)
        first = next(iter(extractors.values()))
        plan = first.plan(["lm_last_token"])
        batch: list[Prepared] = [first.prepare([image], PROMPT, plan) for image in images]
        vectors = {name: e.run(batch)[0].tensors["lm_last_token"] for name, e in extractors.items()}  # warm
        times = alternating_ms(extractors, dict.fromkeys(extractors, batch), args.rounds)
        plain = statistics.median(times["plain"])
        for name, values in times.items():
            ms = statistics.median(values)
            difference = relative_difference(vectors[name], vectors["plain"])
            print(f"{dtype:9} {name:13} {ms:7.1f} ms/image  x{plain / ms:4.2f}  rel diff {difference:.1e}", flush=True)
            rows.append(
                {"dtype": dtype, "variant": name, "ms/image": ms, "vs plain": plain / ms, "rel. difference": difference}
            )
    BENCH.write(args, rows, details={"batch": args.batch, "rounds": args.rounds, "output": "lm_last_token"})


if __name__ == "__main__":
    main()
