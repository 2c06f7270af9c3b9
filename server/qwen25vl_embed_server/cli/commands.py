"""The commands other than ``extract``: serve, info, serve-ray, bulk, make-tiny-model.

Each takes the parsed flags and returns the exit code. Torch and transformers are imported only by
the commands that run the model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING

from qwen25vl_embed import EmbeddingClient
from qwen25vl_embed_server.cli import prompt_format_flags
from qwen25vl_embed_server.cli.adapter_flags import adapters_of
from qwen25vl_embed_server.cli.flags import (
    LIMIT_FLAGS,
    batching_of,
    check_serve_flags,
    limits_of,
    memory_limit_of,
)
from qwen25vl_embed_server.core import defaults
from qwen25vl_embed_server.core.admission.limits import Limits

if TYPE_CHECKING:
    from qwen25vl_embed import ServerInfo
    from qwen25vl_embed_server.core.admission.allocator import MallocSettings
    from qwen25vl_embed_server.core.model.loading import LoadOptions
    from qwen25vl_embed_server.http.serving import HTTPServer
    from qwen25vl_embed_server.rpc.server import ServerConfig

# Failed images listed at the end of a bulk run (the output's error column has every one).
_FAILURES_SHOWN = 20


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of the serve flags. Raises ValueError or OSError for bad flags or files."""
    from qwen25vl_embed_server.core.scheduling.pipeline import PipelineConfig
    from qwen25vl_embed_server.rpc.auth import AuthConfig
    from qwen25vl_embed_server.rpc.calls import ServiceConfig
    from qwen25vl_embed_server.rpc.connections import ConnectionConfig
    from qwen25vl_embed_server.rpc.server import ServerConfig
    from qwen25vl_embed_server.rpc.tls import TLSServerConfig

    check_serve_flags(args)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
    tls = TLSServerConfig.from_files(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    auth = None
    if args.auth_token_file is not None or args.auth_token_env is not None:
        auth = AuthConfig.from_sources(args.auth_token_file, args.auth_token_env)
    connections = ConnectionConfig(
        keepalive_time_s=args.keepalive,
        keepalive_timeout_s=args.keepalive_timeout,
        max_connection_idle_s=args.max_connection_idle,
        max_connection_age_s=args.max_connection_age,
    )
    return ServerConfig(
        host=args.host,
        port=args.port,
        tls=tls,
        auth=auth,
        connections=connections,
        service=ServiceConfig(
            chunk_bytes=args.chunk_bytes,
            stream_window=args.stream_window,
            send_timeout_seconds=args.send_timeout,
            pipeline=PipelineConfig(
                preprocess_workers=args.preprocess_workers,
                batching=batching_of(args),
                limits=_limits(args),
                limit_hints=LIMIT_FLAGS,
                max_tokens_in_flight=args.max_tokens_in_flight,
                max_pixels_in_flight=args.max_pixels_in_flight,
                max_result_bytes=args.max_result_bytes,
                max_request_bytes_in_flight=args.max_request_bytes_in_flight,
                memory_limit=(limit := memory_limit_of(args)),
                trim_after_bytes=malloc_settings(args, limit).trim_after_bytes,
                calibration_seconds=args.calibration_seconds,
            ),
        ),
        grace_seconds=args.grace,
        metrics_port=args.metrics_port or None,
        metrics_host=args.metrics_host,
    )


def malloc_settings(args: argparse.Namespace, memory_limit: int | None) -> MallocSettings:
    """The malloc settings ``serve`` applies: tuned under a memory limit, unless ``--malloc system``."""
    from qwen25vl_embed_server.core.admission import allocator

    return allocator.TUNED if memory_limit is not None and args.malloc == "tuned" else allocator.SYSTEM


def _limits(args: argparse.Namespace) -> Limits:
    try:
        return limits_of(args)
    except ValueError as err:  # name the flag, not the field
        message = str(err)
        for name, flag in LIMIT_FLAGS.items():
            if message.startswith(f"{name} "):
                raise ValueError(f"{flag}{message.removeprefix(name)}") from None
        raise


def http_companions(args: argparse.Namespace, config: ServerConfig) -> list[HTTPServer]:
    """The HTTP API of ``--http-port`` (none without it), on the gRPC port's host, TLS and tokens."""
    from qwen25vl_embed_server.http.config import HTTPConfig
    from qwen25vl_embed_server.http.serving import HTTPServer

    if args.http_port is None:
        return []
    http = HTTPConfig(
        port=args.http_port,
        vector=args.http_vector,
        served_model_name=args.served_model_name,
        max_inputs=args.http_max_inputs,
    )
    return [HTTPServer.beside(config, http)]


def target_error(target: str) -> str | None:
    """Why ``--server`` cannot be dialled as given, or None. A bare host would silently go to
    gRPC's default port 443; a URL scheme (``dns:///``, ``ipv4:``, ``unix:``) is taken as is."""
    if ":" in target.split("]")[-1] or target.startswith(("dns:", "ipv4:", "ipv6:", "unix:")):
        return None
    return f"--server {target}: give host:port (e.g. {target}:50051)"


def client_of(args: argparse.Namespace) -> EmbeddingClient:
    """The SDK client of ``--server`` and the client TLS/token flags. Raises ValueError or OSError."""
    from qwen25vl_embed.channels import TLSConfig
    from qwen25vl_embed_server.rpc.auth import load_tokens

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


def load_options(args: argparse.Namespace) -> LoadOptions:
    from qwen25vl_embed_server.core.model.loading import LoadOptions

    model = args.model or defaults.DEFAULT_MODEL
    # A local checkpoint by its absolute path: what Info reports and manifests record stays
    # meaningful from any working directory.
    return LoadOptions(
        model=os.path.abspath(model) if os.path.isdir(model) else model,
        device=args.device,
        dtype=args.dtype,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        recipe=args.recipe,
        pooling=args.pooling,
        image_tokens_only=args.image_tokens_only,
        fp32_matmul=args.fp32_matmul,
        bf16_arithmetic=args.bf16_arithmetic,
        allow_partial_weights=args.allow_partial_weights,
        adapters=adapters_of(args),
    )


def serve(args: argparse.Namespace) -> int:
    from qwen25vl_embed_server.core.admission import allocator
    from qwen25vl_embed_server.core.errors import ModelLoadError
    from qwen25vl_embed_server.http.config import HTTPListenError
    from qwen25vl_embed_server.rpc.server import ListenError
    from qwen25vl_embed_server.rpc.server import serve as run_server

    try:
        config = server_config(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    allocator.apply(malloc_settings(args, config.service.pipeline.memory_limit))  # before any thread starts
    try:
        companions = http_companions(args, config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run_server(config, load_options(args), companions))
    except ListenError as err:
        print(f"error: {err} (--host, --port, --metrics-host, --metrics-port)", file=sys.stderr)
        return 2
    except HTTPListenError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, ModelLoadError) as err:  # a bad --device / --dtype / --model: one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def info(args: argparse.Namespace) -> int:
    if (problem := target_error(args.server)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        client = client_of(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with client:
        print(json.dumps(asdict(server_info(client, args.wait)), indent=2))
    return 0


def server_info(client: EmbeddingClient, wait: float) -> ServerInfo:
    """The server's info; with ``--wait`` > 0, once it is ready (at most that many seconds)."""
    return client.wait_ready(wait) if wait > 0 else client.info()


def serve_ray(args: argparse.Namespace) -> int:
    # A missing extra (ray, or torch) is reported by cli.app.main, naming the extra.
    from qwen25vl_embed_server.ray.deploy import serve_config_file

    try:
        serve_config_file(args.config, args.address)
    except (ValueError, OSError) as err:  # pydantic's ValidationError is a ValueError
        print(f"error: {args.config}: {err}", file=sys.stderr)
        return 2
    return 0


def bulk(args: argparse.Namespace) -> int:
    from qwen25vl_embed_server.ray.bulk_job import BulkJob, run_bulk

    actors = args.actors or max(1, args.num_gpus)
    try:
        adapters = adapters_of(args)
        if len(adapters) > 1:
            raise ValueError("bulk runs with one --adapter")
        if (problem := prompt_format_flags.flag_problem(args)) is not None:
            raise ValueError(problem)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    job = BulkJob(
        source=args.input,
        output=args.output,
        load=load_options(args),
        outputs=tuple(args.outputs or ()),
        prompt=args.prompt,
        prompt_format=args.prompt_format,
        normalize=args.normalize,
        batch_size=args.batch_size,
        actors=actors,
        gpus_per_actor=args.num_gpus / actors,
        cpus_per_actor=args.cpus_per_actor,
        path_column=args.path_column,
        address=args.address,
        retry_failed=not args.skip_failed,
        adapter=adapters[0].name if adapters else "",
        task=args.task,
    )
    try:
        report = run_bulk(job)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path, message in report.failures[:_FAILURES_SHOWN]:
        print(f"failed: {path}: {message}", file=sys.stderr)
    if len(report.failures) > _FAILURES_SHOWN:
        more = len(report.failures) - _FAILURES_SHOWN
        print(f"failed: {more} more; the error column of {args.output} has them all", file=sys.stderr)
    print(report.summary())
    return 1 if report.failed else 0  # as extract: failed images are reported, the others kept


def make_tiny_model(args: argparse.Namespace) -> int:
    """Prints the folder to pass as ``--model``: OUTDIR, or OUTDIR/adapter with ``--recipe`` (OUTDIR
    itself for jina-v4, whose task adapters sit in OUTDIR/adapters)."""
    if args.recipe is None:
        from qwen25vl_embed_server.core.fixtures.tiny_model import build_tiny_model

        print(build_tiny_model(args.outdir, seed=args.seed))
    elif args.recipe == "jina-v4":
        from qwen25vl_embed_server.core.fixtures.tiny_jina import build_tiny_jina

        print(build_tiny_jina(args.outdir, seed=args.seed))
    else:
        from qwen25vl_embed_server.core.fixtures.tiny_retrieval import build_tiny_retrieval

        print(build_tiny_retrieval(args.outdir, args.recipe, seed=args.seed))
    return 0
