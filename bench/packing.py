"""oneDNN-packed linear layers against torch's own, the model alone, in alternating rounds.

    python bench/packing.py                  # fp32 and bf16, a batch of 4 noise images 448x448
    python bench/packing.py --batch 1 --dtypes float32

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

import argparse
import dataclasses
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # run as a script: bench/ modules import each other
from exact_forwards import alternating_ms
from throughput import PROMPT, checkpoint

from qwen25vl_embed_server.core.extractor import Extractor, Prepared
from qwen25vl_embed_server.core.loading import LoadOptions, load_model
from qwen25vl_embed_server.core.packed_linear import pack_linears


def variants(dtype: str) -> dict[str, Extractor]:
    """Each variant's extractor, packed by hand from an unpacked load (fp32 loads unpacked)."""
    path = str(checkpoint("bench", "cpu", getattr(torch, dtype)))
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
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)) for _ in range(args.batch)]
    for dtype in args.dtypes:
        extractors = variants(dtype)
        first = next(iter(extractors.values()))
        plan = first.plan(["lm_last_token"])
        batch: list[Prepared] = [first.prepare([image], PROMPT, plan) for image in images]
        vectors = {name: e.run(batch)[0].tensors["lm_last_token"] for name, e in extractors.items()}  # warm
        times = alternating_ms(extractors, dict.fromkeys(extractors, batch), args.rounds)
        plain = statistics.median(times["plain"])
        reference = np.asarray(vectors["plain"], np.float64)
        for name, values in times.items():
            ms = statistics.median(values)
            difference = np.abs(np.asarray(vectors[name], np.float64) - reference).max() / np.abs(reference).max()
            print(f"{dtype:9} {name:13} {ms:7.1f} ms/image  x{plain / ms:4.2f}  rel diff {difference:.1e}", flush=True)


if __name__ == "__main__":
    main()
