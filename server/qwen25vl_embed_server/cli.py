"""``qwen25vl-embed``: serve, extract (in-process or through a server), info, make-tiny-model;
serve-ray and bulk with Ray (the ``ray`` extra).

``extract`` keeps the original script's flags and layout: ``<outdir>/<image_stem>/*.npy`` plus
``manifest.json``; pooled vectors by default, token tensors with ``--save-tokens``.
Torch and transformers are imported only by the commands that run the model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qwen25vl_embed import EmbeddingClient, EmbeddingError

from .batcher import BatchingConfig
from .cli_extract import run_extract
from .errors import InvalidInputError
from .limits import Limits
from .logging_setup import LOG_FORMATS, configure_logging
from .outputs import DEFAULT_OUTPUTS, IMAGE_GRID_THW, TOKEN_OUTPUTS

log = logging.getLogger("qwen25vl_embed")

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
DEFAULT_PROMPT = "Describe the image."


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        return int(args.run(args))
    except (EmbeddingError, InvalidInputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen25vl-embed", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=LOG_FORMATS, help="text lines or JSON lines (text)")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gRPC server")
    _model_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    serve.add_argument("--port", type=int, default=50051, help="0 picks a free port (default: 50051)")
    serve.add_argument("--chunk-bytes", type=int, default=1 << 20, help="largest response message (1 MiB)")
    serve.add_argument("--max-request-bytes", type=int, default=64 << 20, help="largest request (64 MiB)")
    serve.add_argument("--grace", type=float, default=10.0, help="seconds in-flight calls get at shutdown")
    _batching_flags(serve)
    serve.add_argument(
        "--metrics-port", type=int, default=0, help="serve Prometheus metrics over HTTP on this port (0: off)"
    )
    serve.add_argument("--metrics-host", default=None, help="bind address of the metrics endpoint (default: --host)")
    _limit_flags(serve)
    _server_security_flags(serve)
    serve.set_defaults(run=_serve)

    extract = commands.add_parser("extract", help="extract embeddings of images into files")
    extract.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    where = extract.add_mutually_exclusive_group()
    where.add_argument("--server", help="host:port of a running server (default: run the model here)")
    _model_flags(extract, group=where)
    extract.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"text after the image ({DEFAULT_PROMPT!r})")
    extract.add_argument("--outdir", type=Path, default=Path("out"), help="output folder (default: out)")
    extract.add_argument(
        "--save-tokens", action="store_true", help=f"also save the token tensors ({', '.join(TOKEN_OUTPUTS)})"
    )
    extract.add_argument("--outputs", nargs="+", default=None, help="exact output names (overrides the defaults)")
    extract.add_argument("--wire-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    extract.add_argument("--normalize", action="store_true", help="L2-normalise the pooled vectors")
    extract.add_argument("--concurrency", type=int, default=8, help="requests in flight with --server (8)")
    _client_security_flags(extract)
    extract.set_defaults(run=_extract)

    info = commands.add_parser("info", help="describe a running server's model")
    info.add_argument("--server", required=True, help="host:port")
    _client_security_flags(info)
    info.set_defaults(run=_info)

    serve_ray = commands.add_parser("serve-ray", help="serve through Ray Serve's gRPC proxy (needs the ray extra)")
    serve_ray.add_argument("--config", required=True, type=Path, help="Ray Serve config file (examples/ray/serve.yaml)")
    serve_ray.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local one)")
    serve_ray.set_defaults(run=_serve_ray)

    bulk = commands.add_parser("bulk", help="images to Parquet with Ray Data, resumable (needs the ray extra)")
    bulk.add_argument("input", metavar="INPUT", help="folder, quoted glob, or Parquet/CSV file with a path column")
    bulk.add_argument("output", metavar="OUTPUT", type=Path, help="Parquet folder; rerun to resume")
    _model_flags(bulk)
    bulk.add_argument("--outputs", nargs="+", default=None, help="output names (default: the pooled vectors)")
    bulk.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"text after the image ({DEFAULT_PROMPT!r})")
    bulk.add_argument("--normalize", action="store_true", help="L2-normalise the pooled vectors")
    bulk.add_argument("--batch-size", type=int, default=16, help="images per model call (16)")
    bulk.add_argument("--num-gpus", type=int, default=0, help="GPUs to use, one actor (model copy) each (0)")
    bulk.add_argument("--actors", type=int, default=None, help="model copies (default: --num-gpus, or 1)")
    bulk.add_argument("--cpus-per-actor", type=float, default=1.0, help="Ray CPUs (and torch threads) per actor (1)")
    bulk.add_argument("--path-column", default="path", help="column of a Parquet/CSV listing (path)")
    bulk.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local one)")
    bulk.set_defaults(run=_bulk)

    tiny = commands.add_parser("make-tiny-model", help="write a random-weight Qwen2.5-VL checkpoint")
    tiny.add_argument("outdir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_make_tiny)
    return parser


def _model_flags(parser: argparse.ArgumentParser, group: Any = None) -> None:
    (group or parser).add_argument(
        "--model", default=None, help=f"hub id or local path, or 'tiny-random' (default: {DEFAULT_MODEL})"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cuda, cuda:1, mps or cpu")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, else fp32), float32, float16, bfloat16")
    parser.add_argument("--min-pixels", type=int, default=None, help="processor min_pixels (checkpoint's default)")
    parser.add_argument("--max-pixels", type=int, default=None, help="processor max_pixels (checkpoint's default)")


def _limit_flags(parser: argparse.ArgumentParser) -> None:
    limits = Limits()
    parser.add_argument(
        "--max-images", type=int, default=limits.max_images, help=f"images per request ({limits.max_images})"
    )
    parser.add_argument(
        "--max-image-bytes",
        type=int,
        default=limits.max_image_bytes,
        help=f"largest encoded image ({limits.max_image_bytes >> 20} MiB)",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=limits.max_pixels,
        help=f"largest decoded image, width x height, checked before decoding ({limits.max_pixels})",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=limits.max_prompt_tokens,
        help=f"longest prompt in tokens ({limits.max_prompt_tokens})",
    )


def _batching_flags(parser: argparse.ArgumentParser) -> None:
    defaults = BatchingConfig()
    group = parser.add_argument_group("batching and pipeline (requests that arrive together run as one forward)")
    group.add_argument("--batch-max-images", type=int, default=defaults.max_images, help="images per batch (32)")
    group.add_argument(
        "--batch-max-tokens", type=int, default=defaults.max_tokens, help="vision patches + LM tokens per batch (32768)"
    )
    group.add_argument(
        "--batch-max-wait-ms", type=float, default=defaults.max_wait_ms, help="wait for company when idle (2 ms)"
    )
    group.add_argument("--max-queue", type=int, default=defaults.max_queue, help="queued requests, then refuse (256)")
    group.add_argument("--preprocess-workers", type=int, default=4, help="threads decoding and preprocessing (4)")
    group.add_argument("--stream-window", type=int, default=64, help="requests in flight per ExtractBatch stream (64)")


def _server_security_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TLS and authentication (tokens are never given on the command line)")
    group.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM); with --tls-key enables TLS")
    group.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    group.add_argument("--tls-client-ca", type=Path, help="CA (PEM) that signs client certificates: mutual TLS")
    group.add_argument("--auth-token-file", type=Path, help="file of accepted bearer tokens, one per line")
    group.add_argument("--auth-token-env", metavar="VAR", help="environment variable holding the accepted token(s)")


def _client_security_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TLS and authentication, with --server (tokens never on the command line)")
    group.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    group.add_argument("--tls-ca", type=Path, help="CA (PEM) that signs the server's certificate; implies --tls")
    group.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mutual TLS; implies --tls")
    group.add_argument("--tls-key", type=Path, help="client private key (PEM)")
    group.add_argument("--token-file", type=Path, help="file holding the bearer token")
    group.add_argument("--token-env", metavar="VAR", help="environment variable holding the bearer token")


def _server_config(args: argparse.Namespace) -> Any:
    """The ServerConfig of the serve flags. Raises ValueError or OSError for bad flags or files."""
    from .auth import AuthConfig
    from .server import ServerConfig
    from .service import ServiceConfig
    from .tls import TLSServerConfig

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
    tls = TLSServerConfig.from_files(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    auth = None
    if args.auth_token_file is not None or args.auth_token_env is not None:
        auth = AuthConfig.from_sources(args.auth_token_file, args.auth_token_env)
    limits = Limits(
        max_request_bytes=args.max_request_bytes,
        max_images=args.max_images,
        max_image_bytes=args.max_image_bytes,
        max_pixels=args.max_image_pixels,
        max_prompt_tokens=args.max_prompt_tokens,
    )
    return ServerConfig(
        host=args.host,
        port=args.port,
        limits=limits,
        tls=tls,
        auth=auth,
        service=ServiceConfig(
            chunk_bytes=args.chunk_bytes,
            preprocess_workers=args.preprocess_workers,
            stream_window=args.stream_window,
            batching=BatchingConfig(
                max_images=args.batch_max_images,
                max_tokens=args.batch_max_tokens,
                max_wait_ms=args.batch_max_wait_ms,
                max_queue=args.max_queue,
            ),
        ),
        grace_seconds=args.grace,
        metrics_port=args.metrics_port or None,
        metrics_host=args.metrics_host,
    )


def _client(args: argparse.Namespace) -> EmbeddingClient:
    """The SDK client of ``--server`` and the client TLS/token flags. Raises ValueError or OSError."""
    from qwen25vl_embed.channels import TLSConfig

    from .auth import load_tokens

    tls = None
    if args.tls or args.tls_ca is not None or args.tls_cert is not None or args.tls_key is not None:
        tls = TLSConfig(ca_cert=args.tls_ca, client_cert=args.tls_cert, client_key=args.tls_key)
    token = None
    if args.token_file is not None or args.token_env is not None:
        tokens = load_tokens(args.token_file, args.token_env)
        if len(tokens) != 1:
            raise ValueError(f"expected one bearer token, found {len(tokens)}")
        token = tokens[0]
    return EmbeddingClient(args.server, tls=tls, token=token)


def _load_options(args: argparse.Namespace) -> Any:
    from .loading import LoadOptions

    return LoadOptions(
        model=args.model or DEFAULT_MODEL,
        device=args.device,
        dtype=args.dtype,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
    )


def _serve(args: argparse.Namespace) -> int:
    from .server import serve

    try:
        config = _server_config(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    asyncio.run(serve(config, _load_options(args)))
    return 0


def _extract(args: argparse.Namespace) -> int:
    outputs = list(args.outputs or (*DEFAULT_OUTPUTS, *(TOKEN_OUTPUTS if args.save_tokens else ())))
    outputs.append(IMAGE_GRID_THW)
    if not args.server and _uses_client_security(args):
        print("error: the TLS and token flags need --server", file=sys.stderr)
        return 2
    try:
        return run_extract(args, outputs, lambda: _client(args), lambda: _load_options(args))
    except (ValueError, OSError) as err:  # unreadable TLS or token files
        print(f"error: {err}", file=sys.stderr)
        return 2


def _uses_client_security(args: argparse.Namespace) -> bool:
    flags = (args.tls_ca, args.tls_cert, args.tls_key, args.token_file, args.token_env)
    return bool(args.tls) or any(flag is not None for flag in flags)


def _info(args: argparse.Namespace) -> int:
    try:
        client = _client(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with client:
        print(json.dumps(asdict(client.info()), indent=2))
    return 0


def _serve_ray(args: argparse.Namespace) -> int:
    try:
        from .ray_serve import serve_config_file
    except ImportError as err:
        print(f"error: serve-ray needs Ray: pip install 'qwen25vl-embed[ray]' ({err})", file=sys.stderr)
        return 2
    try:
        serve_config_file(args.config, args.address)
    except (ValueError, OSError) as err:  # pydantic's ValidationError is a ValueError
        print(f"error: {args.config}: {err}", file=sys.stderr)
        return 2
    return 0


def _bulk(args: argparse.Namespace) -> int:
    try:
        from .ray_bulk import BulkJob, run_bulk
    except ImportError as err:
        print(f"error: bulk needs Ray: pip install 'qwen25vl-embed[ray]' ({err})", file=sys.stderr)
        return 2
    actors = args.actors or max(1, args.num_gpus)
    job = BulkJob(
        source=args.input,
        output=args.output,
        load=_load_options(args),
        outputs=tuple(args.outputs or ()),
        prompt=args.prompt,
        normalize=args.normalize,
        batch_size=args.batch_size,
        actors=actors,
        gpus_per_actor=args.num_gpus / actors,
        cpus_per_actor=args.cpus_per_actor,
        path_column=args.path_column,
        address=args.address,
    )
    try:
        report = run_bulk(job)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 1 if report.failed else 0  # as extract: failed images are reported, the others kept


def _make_tiny(args: argparse.Namespace) -> int:
    from .tiny_model import build_tiny_model

    print(build_tiny_model(args.outdir, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
