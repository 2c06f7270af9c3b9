"""Every default of the service in one place: the CLI flags, Ray settings and configs read them.

Torch-free, so the command line can show them without loading the model's libraries. Limits have
their own home (:class:`~qwen25vl_embed_server.core.admission.limits.Limits`), and so do the batcher's
bounds (:class:`~qwen25vl_embed_server.core.scheduling.batcher.BatchingConfig`).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
"""The checkpoint loaded when none is named (a hub id; ``tiny-random`` builds one offline)."""
TINY_MODEL_NAME = "tiny-random"
"""The model name that resolves to a tiny checkpoint built (once, cached) on this machine."""

DEFAULT_PROMPT = "Describe the image."
"""The text after the image(s) in the user turn when a request sets no prompt."""

DEFAULT_CHUNK_BYTES = 1 << 20
"""Largest response message (1 MiB): token tensors are split across messages of at most this."""

DEFAULT_PREPROCESS_WORKERS = 4
"""Threads decoding images and running the processor, beside the model's lanes."""

DEFAULT_STREAM_WINDOW = 64
"""Requests of one ExtractBatch stream in flight at once; the server reads no further ahead."""

DEFAULT_DEVICE = "auto"
"""cuda > mps > cpu."""

DEFAULT_DTYPE = "auto"
"""bfloat16 on cuda, float32 elsewhere (exact against transformers on the CPU)."""

FP32_MATMULS = ("exact", "onednn")
"""fp32 matmuls on the CPU: ``exact``, torch's own (bit-exact against transformers); ``onednn``,
prepacked oneDNN weights (faster, not bit-exact; see ``core/cpu/packed_linear.py``)."""

DEFAULT_FP32_MATMUL = "exact"

BF16_ARITHMETICS = ("auto", "native", "float32")
"""How a bf16 CPU model computes its dot products: ``native`` (torch's bf16 kernels), ``float32``
(widened to float32, rounded to bf16 after each sum) or ``auto`` (float32 where the CPU has no bf16
dot products)."""

ARITHMETICS = ("exact", "fp32-onednn", "bf16-float32")
"""How a loaded model's dot products run (reported by Info): transformers' own kernels (its bits
for a request run alone at the model's full thread count; batched or narrower, within float rounding);
fp32 through prepacked oneDNN weights (``--fp32-matmul onednn``); bf16 in float32 arithmetic
(``--bf16-arithmetic`` float32, or auto on a CPU without bf16 dot products)."""

DEFAULT_BF16_ARITHMETIC = "auto"
"""bf16 on the CPU: float32 arithmetic where the CPU has no bf16 dot products (2.1-2.3x faster in the model
there, within bf16 rounding), torch's bf16 kernels elsewhere (see ``core/cpu/bf16_arithmetic.py``)."""

DEFAULT_WIRE_DTYPE = "float32"
"""The dtype floating outputs travel in when a request names none."""

DEFAULT_MAX_TOKENS_IN_FLIGHT = 262_144
"""Server-wide tokens (patches + LM sequence) between decoding and the end of the model run: two
requests at the per-request cap, or hundreds of small ones."""

DEFAULT_MAX_PIXELS_IN_FLIGHT = 200_000_000
"""Server-wide decoded pixels being preprocessed (600 MB as RGB): four images at the decoder's limit."""

DEFAULT_MAX_RESULT_BYTES = 1 << 30
"""Server-wide bytes of results computed or being computed and not yet sent (1 GiB)."""

DEFAULT_SEND_TIMEOUT_SECONDS = 60.0
"""How long an ExtractBatch caller may take no response before its call is ended."""


def cache_root() -> Path:
    """Where the project keeps what it builds once (the ``tiny-random`` checkpoint, the MKL dispatch
    definition): ``$QWEN25VL_EMBED_CACHE``, else ``~/.cache/qwen25vl-embed``."""
    return Path(os.environ.get("QWEN25VL_EMBED_CACHE") or Path.home() / ".cache" / "qwen25vl-embed")
