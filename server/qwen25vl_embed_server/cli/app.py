"""``qwen25vl-embed``: serve, extract (in-process or through a server), info, make-tiny-model;
serve-ray and bulk with Ray (the ``ray`` extra).

``extract`` keeps the original script's flags and layout: ``<outdir>/<image_stem>/*.npy`` plus
``manifest.json``; pooled vectors by default, token tensors with ``--save-tokens``.
Torch and transformers are imported only by the commands that run the model.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from qwen25vl_embed import EmbeddingError
from qwen25vl_embed_server.cli import commands
from qwen25vl_embed_server.cli.adapter_flags import adapter_flag
from qwen25vl_embed_server.cli.check_model import check_model
from qwen25vl_embed_server.cli.extract import extract
from qwen25vl_embed_server.cli.flags import (
    batching_flags,
    client_security_flags,
    limit_flags,
    model_flags,
    prompt_flag,
    server_security_flags,
    wait_flag,
)
from qwen25vl_embed_server.cli.http_flags import http_flags
from qwen25vl_embed_server.cli.logging_setup import LOG_FORMATS, configure_logging
from qwen25vl_embed_server.cli.prompt_format_flags import prompt_format_flag
from qwen25vl_embed_server.core import defaults
from qwen25vl_embed_server.core.errors import InvalidInputError
from qwen25vl_embed_server.core.model.outputs import TOKEN_OUTPUTS
from qwen25vl_embed_server.core.retrieval.recipes import RECIPES

# The modules each extra brings (import names): a command that misses one says which extra to install.
_EXTRAS = {
    "server": frozenset(
        {"torch", "torchvision", "transformers", "grpc_health", "grpc_reflection", "prometheus_client"}
    ),
    "ray": frozenset({"ray", "pyarrow", "pydantic", "yaml"}),
}
_SERVER = "needs the server extra"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    command = args.run.__name__.replace("_", "-")
    try:
        return int(args.run(args))
    except (EmbeddingError, InvalidInputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as err:
        missing = (err.name or "").partition(".")[0]
        for extra, modules in _EXTRAS.items():
            if missing in modules:
                print(
                    f"error: {command} needs the {extra} extra ({missing} is not installed): "
                    f"pip install 'qwen25vl-embed[{extra}]'",
                    file=sys.stderr,
                )
                return 2
        raise
    except BrokenPipeError:
        # `qwen25vl-embed info | head`: the reader left. Point stdout at /dev/null so that the
        # interpreter's final flush does not fail again, and exit as a shell's SIGPIPE would.
        _silence_stdout()
        return 141
    except KeyboardInterrupt:
        return 130


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. captured in tests)
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen25vl-embed", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=LOG_FORMATS, help="text lines or JSON lines (text)")
    subcommands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = subcommands.add_parser("serve", help=f"run the gRPC server ({_SERVER})")
    model_flags(serve)
    adapter_flag(serve)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    serve.add_argument("--port", type=int, default=50051, help="0 picks a free port (default: 50051)")
    serve.add_argument(
        "--chunk-bytes",
        type=int,
        default=defaults.DEFAULT_CHUNK_BYTES,
        help=f"largest response message ({defaults.DEFAULT_CHUNK_BYTES >> 20} MiB)",
    )
    serve.add_argument("--grace", type=float, default=10.0, help="seconds in-flight calls get at shutdown")
    serve.add_argument(
        "--keepalive", type=float, default=60.0, help="seconds without traffic before pinging a busy connection (60)"
    )
    serve.add_argument(
        "--keepalive-timeout", type=float, default=20.0, help="seconds a ping waits for its answer, then closes (20)"
    )
    serve.add_argument(
        "--max-connection-idle", type=float, default=300.0, help="seconds a connection without calls stays open (300)"
    )
    serve.add_argument(
        "--max-connection-age", type=float, default=None, help="seconds before a connection is asked to go (never)"
    )
    batching_flags(serve)
    serve.add_argument(
        "--metrics-port", type=int, default=0, help="serve Prometheus metrics over HTTP on this port (0: off)"
    )
    serve.add_argument("--metrics-host", default=None, help="bind address of the metrics endpoint (default: --host)")
    limit_flags(serve)
    server_security_flags(serve)
    http_flags(serve)
    serve.set_defaults(run=commands.serve)

    extract_ = subcommands.add_parser(
        "extract", help=f"extract embeddings of images into files (in-process: {_SERVER}; --server: not)"
    )
    extract_.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    where = extract_.add_mutually_exclusive_group()
    where.add_argument("--server", help=f"host:port of a running server (default: run the model here, which {_SERVER})")
    model_flags(extract_, group=where)
    adapter_flag(
        extract_,
        "with --server: the server's retrieval adapter to run with, by NAME; in-process: NAME=PATH, an adapter "
        "loaded on the --model base and run with",
    )
    prompt_flag(extract_)
    prompt_format_flag(extract_)
    task_flag(extract_)
    extract_.add_argument(
        "--outdir", type=Path, default=Path("out"), help="output folder; mirrors the input tree (default: out)"
    )
    extract_.add_argument(
        "--flat",
        action="store_true",
        help="one <outdir>/<image_stem>/ per image, whatever the tree (names must differ)",
    )
    extract_.add_argument(
        "--save-tokens", action="store_true", help=f"also save the token tensors ({', '.join(TOKEN_OUTPUTS)})"
    )
    extract_.add_argument("--outputs", nargs="+", default=None, help="exact output names (overrides the defaults)")
    extract_.add_argument(
        "--wire-dtype", default=defaults.DEFAULT_WIRE_DTYPE, choices=["float32", "float16", "bfloat16"]
    )
    extract_.add_argument("--normalize", action="store_true", help="L2-normalise the pooled vectors")
    extract_.add_argument("--concurrency", type=int, default=8, help="requests in flight with --server (8)")
    extract_.add_argument(
        "--skip-existing",
        action="store_true",
        help="skip images whose folder already holds a complete manifest with these outputs (resume)",
    )
    wait_flag(extract_)
    client_security_flags(extract_)
    extract_.set_defaults(run=extract)

    info = subcommands.add_parser("info", help="describe a running server's model")
    info.add_argument("--server", required=True, help="host:port")
    wait_flag(info)
    client_security_flags(info)
    info.set_defaults(run=commands.info)

    serve_ray = subcommands.add_parser(
        "serve-ray", help="serve through Ray Serve's gRPC proxy (needs the server and ray extras)"
    )
    serve_ray.add_argument("--config", required=True, type=Path, help="Ray Serve config file (examples/ray/serve.yaml)")
    serve_ray.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local one)")
    serve_ray.set_defaults(run=commands.serve_ray)

    bulk = subcommands.add_parser(
        "bulk", help="images to Parquet with Ray Data, resumable (needs the server and ray extras)"
    )
    bulk.add_argument("input", metavar="INPUT", help="folder, quoted glob, or Parquet/CSV file with a path column")
    bulk.add_argument("output", metavar="OUTPUT", type=Path, help="Parquet folder; rerun to resume")
    model_flags(bulk)
    adapter_flag(
        bulk, "a retrieval adapter (PEFT LoRA folder) loaded on the --model base as NAME; every image runs with it"
    )
    bulk.add_argument("--outputs", nargs="+", default=None, help="output names (default: the pooled vectors)")
    prompt_flag(bulk)
    prompt_format_flag(bulk)
    bulk.add_argument("--normalize", action="store_true", help="L2-normalise the pooled vectors")
    task_flag(bulk)
    bulk.add_argument("--batch-size", type=int, default=16, help="images per model call (16)")
    bulk.add_argument("--num-gpus", type=int, default=0, help="GPUs to use, one actor (model copy) each (0)")
    bulk.add_argument("--actors", type=int, default=None, help="model copies (default: --num-gpus, or 1)")
    bulk.add_argument("--cpus-per-actor", type=float, default=1.0, help="Ray CPUs (and torch threads) per actor (1)")
    bulk.add_argument("--path-column", default="path", help="column of a Parquet/CSV listing (path)")
    bulk.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local one)")
    bulk.add_argument(
        "--skip-failed",
        action="store_true",
        help="keep the error rows that a previous run wrote and skip those images (default: a rerun retries them)",
    )
    bulk.set_defaults(run=commands.bulk)

    tiny = subcommands.add_parser(
        "make-tiny-model", help=f"write a random-weight Qwen2.5-VL checkpoint, offline ({_SERVER})"
    )
    tiny.add_argument("outdir", type=Path, help="folder to write the checkpoint to")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (0)")
    tiny.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default=None,
        help="a retrieval model instead, as published: OUTDIR/base and the LoRA adapter OUTDIR/adapter, "
        "the folder to serve; jina-v4: OUTDIR in its layout, the task LoRAs in OUTDIR/adapters "
        "(default: a plain Qwen2.5-VL)",
    )
    tiny.set_defaults(run=commands.make_tiny_model)

    check = subcommands.add_parser(
        "check-model",
        help=f"load a checkpoint as serve would, say what it holds, run one image and one text ({_SERVER})",
    )
    check.add_argument("model", help="the checkpoint: a local folder (or adapter folder), a hub id, or 'tiny-random'")
    model_flags(check, model=False)
    check.set_defaults(run=check_model)
    return parser


def task_flag(parser: argparse.ArgumentParser) -> None:
    """``--task``: the recipe's task every request runs with."""
    parser.add_argument(
        "--task",
        default="",
        help="the recipe's task, for a model with tasks (jina-embeddings-v4: retrieval, text-matching, code); "
        "default: its first (retrieval)",
    )


if __name__ == "__main__":
    sys.exit(main())
