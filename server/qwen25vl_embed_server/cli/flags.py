"""The command line's shared flag groups, each reading its defaults from the core's one home.

Also :data:`LIMIT_FLAGS`: which ``serve`` flag sets each limit, so a refusal can tell the operator.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from qwen25vl_embed_server.cli.adapter_flags import adapters_of
from qwen25vl_embed_server.core import defaults
from qwen25vl_embed_server.core.admission.calibration import DEFAULT_CALIBRATION_SECONDS
from qwen25vl_embed_server.core.admission.limits import Limits
from qwen25vl_embed_server.core.admission.memory import DEFAULT_MEMORY_SHARE, default_memory_limit, parse_size
from qwen25vl_embed_server.core.retrieval.recipes import RECIPE_CHOICES
from qwen25vl_embed_server.core.scheduling.batcher import (
    ACCELERATOR_BATCH_TOKENS,
    ACCELERATOR_LANES,
    CPU_BATCH_TOKENS,
    CPU_LANES,
    BatchingConfig,
)

LIMIT_FLAGS: dict[str, str] = {
    "max_request_bytes": "--max-request-bytes",
    "max_images": "--max-images",
    "max_image_bytes": "--max-image-bytes",
    # --max-pixels is the processor's resize target; this is the decoder's refusal threshold.
    "max_pixels": "--max-image-pixels",
    "max_prompt_tokens": "--max-prompt-tokens",
    "max_request_tokens": "--max-request-tokens",
}
"""``serve`` flag of each :class:`Limits` field."""


_PER_REQUEST = "; with --server: sent with each request, within the server's range"


def model_flags(parser: argparse.ArgumentParser, group: Any = None, model: bool = True) -> None:
    """--model (in ``group`` when given, e.g. exclusive with --server; none where ``model`` is False:
    the command takes the model as an argument), --device, --dtype, pixels."""
    if model:
        (group or parser).add_argument(
            "--model", default=None, help=f"hub id or local path, or 'tiny-random' (default: {defaults.DEFAULT_MODEL})"
        )
    parser.add_argument(
        "--device", default=defaults.DEFAULT_DEVICE, help="auto (cuda > mps > cpu), cuda, cuda:1, mps or cpu"
    )
    parser.add_argument(
        "--dtype", default=defaults.DEFAULT_DTYPE, help="auto (bf16 on cuda, else fp32), float32, float16, bfloat16"
    )
    parser.add_argument(
        "--fp32-matmul",
        choices=defaults.FP32_MATMULS,
        default=defaults.DEFAULT_FP32_MATMUL,
        help="fp32 on the CPU: exact (torch's matmul, bit-exact against transformers) or onednn "
        "(prepacked oneDNN weights: faster, differs by float rounding, ~1e-6 relative) "
        f"({defaults.DEFAULT_FP32_MATMUL}; bf16 is packed either way: exact there)",
    )
    parser.add_argument(
        "--bf16-arithmetic",
        choices=defaults.BF16_ARITHMETICS,
        default=defaults.DEFAULT_BF16_ARITHMETIC,
        help="bf16 on the CPU: native (torch's bf16 kernels, bit-exact against transformers' bf16), "
        "float32 (dot products in float32, rounded to bf16: ~2x faster in the model on CPUs without AVX512-BF16/AMX, "
        "within bf16 rounding) or auto (float32 where the CPU lacks bf16 dot products) "
        f"({defaults.DEFAULT_BF16_ARITHMETIC})",
    )
    parser.add_argument(
        "--min-pixels",
        type=int,
        default=None,
        help=f"resize images to at least this many pixels (the checkpoint's){_PER_REQUEST}",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help=f"resize images to at most this many pixels (the checkpoint's){_PER_REQUEST}",
    )
    parser.add_argument(
        "--recipe",
        choices=RECIPE_CHOICES,
        default="auto",
        help="retrieval recipe: auto (detected from a ColQwen2.5/BiQwen2.5 checkpoint or adapter), none (raw states)",
    )
    parser.add_argument(
        "--pooling", choices=("last", "mean"), default=None, help="single-vector recipes: pooling (recipe's default)"
    )
    parser.add_argument(
        "--image-tokens-only", action="store_true", help="multi-vector recipes: documents keep image-token vectors only"
    )
    parser.add_argument(
        "--allow-partial-weights",
        action="store_true",
        help="load a checkpoint or adapter whose weights do not all fit the model (missing ones stay random), "
        "with a warning; without it such a model is refused",
    )


def prompt_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompt",
        default=None,
        help=f"text after the image in the chat format (default {defaults.DEFAULT_PROMPT!r}); the whole text in raw",
    )


def limit_flags(parser: argparse.ArgumentParser) -> None:
    limits = Limits()
    parser.add_argument(
        LIMIT_FLAGS["max_request_bytes"],
        type=int,
        default=limits.max_request_bytes,
        help=f"largest request ({limits.max_request_bytes >> 20} MiB)",
    )
    parser.add_argument(
        LIMIT_FLAGS["max_images"], type=int, default=limits.max_images, help=f"images per request ({limits.max_images})"
    )
    parser.add_argument(
        LIMIT_FLAGS["max_image_bytes"],
        type=int,
        default=limits.max_image_bytes,
        help=f"largest encoded image ({limits.max_image_bytes >> 20} MiB)",
    )
    parser.add_argument(
        LIMIT_FLAGS["max_pixels"],
        type=int,
        default=limits.max_pixels,
        help=f"largest decoded image, width x height, checked before decoding ({limits.max_pixels})",
    )
    parser.add_argument(
        LIMIT_FLAGS["max_prompt_tokens"],
        type=int,
        default=limits.max_prompt_tokens,
        help=f"longest prompt in tokens ({limits.max_prompt_tokens})",
    )
    parser.add_argument(
        LIMIT_FLAGS["max_request_tokens"],
        type=int,
        default=limits.max_request_tokens,
        help=f"most work in one request: vision patches + LM sequence ({limits.max_request_tokens})",
    )


def limits_of(args: argparse.Namespace) -> Limits:
    """The :class:`Limits` of the limit flags. Raises ValueError for a bad value."""
    return Limits(
        max_request_bytes=args.max_request_bytes,
        max_images=args.max_images,
        max_image_bytes=args.max_image_bytes,
        max_pixels=args.max_image_pixels,
        max_prompt_tokens=args.max_prompt_tokens,
        max_request_tokens=args.max_request_tokens,
    )


def batching_flags(parser: argparse.ArgumentParser) -> None:
    batching = BatchingConfig()
    group = parser.add_argument_group("batching and pipeline (requests that arrive together run as one forward)")
    group.add_argument(
        "--batch-max-images", type=int, default=batching.max_images, help=f"images per batch ({batching.max_images})"
    )
    group.add_argument(
        "--batch-max-tokens",
        type=int,
        default=batching.max_tokens,
        help=f"vision patches + LM tokens per batch ({CPU_BATCH_TOKENS} on the CPU, {ACCELERATOR_BATCH_TOKENS} else)",
    )
    group.add_argument(
        "--batch-max-wait-ms",
        type=float,
        default=batching.max_wait_ms,
        help=f"wait for company when idle ({batching.max_wait_ms:g} ms)",
    )
    group.add_argument(
        "--max-piece-tokens",
        type=int,
        default=batching.max_piece_tokens,
        help=(
            "a request costing more runs alone, in pieces of at most this many vision patches (one image at least),"
            f" with small requests run between them; 0: never split ({batching.max_piece_tokens})"
        ),
    )
    group.add_argument(
        "--model-lanes",
        type=int,
        default=batching.lanes,
        help=(
            f"batches the model runs side by side, on a share of torch's threads each ({CPU_LANES} on the CPU,"
            f" {ACCELERATOR_LANES} else; at most one per thread)"
        ),
    )
    group.add_argument(
        "--max-queue", type=int, default=batching.max_queue, help=f"queued requests, then refuse ({batching.max_queue})"
    )
    group.add_argument(
        "--preprocess-workers",
        type=int,
        default=defaults.DEFAULT_PREPROCESS_WORKERS,
        help=f"threads decoding and preprocessing ({defaults.DEFAULT_PREPROCESS_WORKERS})",
    )
    group.add_argument(
        "--memory-limit",
        type=memory_limit,
        default=None,
        metavar="SIZE",
        help=(
            "bytes the whole process may hold (12G, 800MiB, or bytes): the model's weights and runtime come off, "
            "the server-wide budgets below share the rest, and the server sets glibc's malloc so that RSS "
            f"follows them; 'none': fixed budgets (default: {DEFAULT_MEMORY_SHARE:.0%} of the cgroup's memory limit, "
            "else of the machine's memory)"
        ),
    )
    group.add_argument(
        "--malloc",
        choices=("tuned", "system"),
        default="tuned",
        help="with a memory limit: tuned (glibc's malloc set so that RSS follows the budgets: at most 2 arenas, "
        "freed memory given back after a large request) or system (glibc's defaults) (tuned)",
    )
    group.add_argument(
        "--max-tokens-in-flight",
        type=int,
        default=None,
        help="server-wide tokens decoded, not yet run; new work waits (from --memory-limit; "
        f"{defaults.DEFAULT_MAX_TOKENS_IN_FLIGHT} with none)",
    )
    group.add_argument(
        "--max-pixels-in-flight",
        type=int,
        default=None,
        help="server-wide decoded pixels being preprocessed (from --memory-limit; "
        f"{defaults.DEFAULT_MAX_PIXELS_IN_FLIGHT} with none)",
    )
    group.add_argument(
        "--max-result-bytes",
        type=int,
        default=None,
        help="server-wide bytes of results not yet sent (from --memory-limit; "
        f"{defaults.DEFAULT_MAX_RESULT_BYTES >> 20} MiB with none)",
    )
    group.add_argument(
        "--max-request-bytes-in-flight",
        type=int,
        default=None,
        help="server-wide bytes of requests admitted and not finished; beyond, RESOURCE_EXHAUSTED at once "
        "(from --memory-limit; unbounded with none)",
    )
    group.add_argument(
        "--calibration-seconds",
        type=float,
        default=DEFAULT_CALIBRATION_SECONDS,
        metavar="SECONDS",
        help="before reporting SERVING, run a few synthetic requests of growing size within about this long, so "
        "that deadline admission knows what each size costs from the first request; 0: none "
        f"({DEFAULT_CALIBRATION_SECONDS:g})",
    )
    group.add_argument(
        "--send-timeout",
        type=float,
        default=defaults.DEFAULT_SEND_TIMEOUT_SECONDS,
        help=f"end a call that reads no response this long ({defaults.DEFAULT_SEND_TIMEOUT_SECONDS:g} s)",
    )
    group.add_argument(
        "--stream-window",
        type=int,
        default=defaults.DEFAULT_STREAM_WINDOW,
        help=f"requests in flight per ExtractBatch stream ({defaults.DEFAULT_STREAM_WINDOW})",
    )


NO_MEMORY_LIMIT = 0
"""``--memory-limit none``: no limit (fixed budgets)."""


def memory_limit(text: str) -> int:
    """``--memory-limit``'s value: bytes, or :data:`NO_MEMORY_LIMIT` for 'none'."""
    if text.strip().lower() == "none":
        return NO_MEMORY_LIMIT
    try:
        value = parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value


def memory_limit_of(args: argparse.Namespace) -> int | None:
    """The memory limit in bytes (None: none): the flag's, else the default share of the machine's."""
    if args.memory_limit is None:
        return default_memory_limit()
    return args.memory_limit or None


def batching_of(args: argparse.Namespace) -> BatchingConfig:
    return BatchingConfig(
        max_images=args.batch_max_images,
        max_tokens=args.batch_max_tokens,
        max_wait_ms=args.batch_max_wait_ms,
        max_queue=args.max_queue,
        max_piece_tokens=args.max_piece_tokens,
        lanes=args.model_lanes,
    )


def server_security_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TLS and authentication (tokens are never given on the command line)")
    group.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM); with --tls-key enables TLS")
    group.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    group.add_argument("--tls-client-ca", type=Path, help="CA (PEM) that signs client certificates: mutual TLS")
    group.add_argument("--auth-token-file", type=Path, help="file of accepted bearer tokens, one per line")
    group.add_argument("--auth-token-env", metavar="VAR", help="environment variable holding the accepted token(s)")


def client_security_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TLS and authentication, with --server (tokens never on the command line)")
    group.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    group.add_argument("--tls-ca", type=Path, help="CA (PEM) that signs the server's certificate; implies --tls")
    group.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mutual TLS; implies --tls")
    group.add_argument("--tls-key", type=Path, help="client private key (PEM)")
    group.add_argument("--token-file", type=Path, help="file holding the bearer token")
    group.add_argument("--token-env", metavar="VAR", help="environment variable holding the bearer token")


def wait_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to this long for the server to be up and its model loaded (default: do not wait)",
    )


def uses_client_security(args: argparse.Namespace) -> bool:
    flags = (args.tls_ca, args.tls_cert, args.tls_key, args.token_file, args.token_env)
    return bool(args.tls) or any(flag is not None for flag in flags)


# serve's numeric flags: (flag, attribute, smallest, largest or None). A value outside would hang
# (--stream-window 0), crash (--preprocess-workers 0) or refuse everything (--max-queue 0).
_INT32_MAX = 2**31 - 1  # gRPC's message size options are C ints
SERVE_FLAG_RANGES: tuple[tuple[str, str, float, float | None], ...] = (
    ("--port", "port", 0, 65535),
    ("--http-port", "http_port", 0, 65535),
    ("--http-max-inputs", "http_max_inputs", 1, None),
    ("--metrics-port", "metrics_port", 0, 65535),
    ("--chunk-bytes", "chunk_bytes", 1024, _INT32_MAX),
    ("--stream-window", "stream_window", 1, None),
    ("--preprocess-workers", "preprocess_workers", 1, 1024),
    ("--max-queue", "max_queue", 1, None),
    ("--batch-max-images", "batch_max_images", 1, None),
    ("--batch-max-tokens", "batch_max_tokens", 1, None),
    ("--batch-max-wait-ms", "batch_max_wait_ms", 0, 60_000),
    ("--max-piece-tokens", "max_piece_tokens", 0, None),
    ("--model-lanes", "model_lanes", 1, 1024),
    ("--grace", "grace", 0, 86_400),
    ("--send-timeout", "send_timeout", 0.001, 86_400),
    ("--calibration-seconds", "calibration_seconds", 0, 3600),
    ("--min-pixels", "min_pixels", 1, None),
    ("--max-pixels", "max_pixels", 1, None),
    (LIMIT_FLAGS["max_request_bytes"], "max_request_bytes", 1, _INT32_MAX),
    (LIMIT_FLAGS["max_images"], "max_images", 1, None),
    (LIMIT_FLAGS["max_image_bytes"], "max_image_bytes", 1, None),
    (LIMIT_FLAGS["max_pixels"], "max_image_pixels", 1, None),
    (LIMIT_FLAGS["max_prompt_tokens"], "max_prompt_tokens", 1, None),
    (LIMIT_FLAGS["max_request_tokens"], "max_request_tokens", 1, None),
    ("--max-tokens-in-flight", "max_tokens_in_flight", 1, None),
    ("--max-pixels-in-flight", "max_pixels_in_flight", 1, None),
    ("--max-result-bytes", "max_result_bytes", 1, None),
    ("--max-request-bytes-in-flight", "max_request_bytes_in_flight", 1, None),
    # gRPC's time options are C ints of milliseconds: at most about 24 days.
    ("--keepalive", "keepalive", 0.001, _INT32_MAX // 1000),
    ("--keepalive-timeout", "keepalive_timeout", 0.001, _INT32_MAX // 1000),
    ("--max-connection-idle", "max_connection_idle", 0.001, _INT32_MAX // 1000),
    ("--max-connection-age", "max_connection_age", 0.001, _INT32_MAX // 1000),
)


def check_serve_flags(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first serve flag whose value is out of range (NaN included)."""
    for flag, attribute, smallest, largest in SERVE_FLAG_RANGES:
        value = getattr(args, attribute, None)
        if value is None:  # not given, where None means "the checkpoint's default"
            continue
        if not (math.isfinite(value) and value >= smallest and (largest is None or value <= largest)):
            bound = f"at least {smallest:g}" if largest is None else f"between {smallest:g} and {largest:g}"
            raise ValueError(f"{flag} must be {bound}, got {value!r}")
    if args.min_pixels is not None and args.max_pixels is not None and args.min_pixels > args.max_pixels:
        raise ValueError(f"--min-pixels ({args.min_pixels}) must not exceed --max-pixels ({args.max_pixels})")
    if adapters_of(args) and args.recipe not in ("auto", "none"):
        raise ValueError(f"--recipe {args.recipe} serves a model alone; with --adapter each adapter has its own recipe")
