"""``qwen25vl-embed``: serve, extract (in-process or through a server), info, make-tiny-model.

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

from qwen25vl_embed import EmbeddingClient, EmbeddingError, Embeddings

from .errors import InvalidInputError
from .outputs import DEFAULT_OUTPUTS, IMAGE_GRID_THW, TOKEN_OUTPUTS

log = logging.getLogger("qwen25vl_embed")

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
DEFAULT_PROMPT = "Describe the image."


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gRPC server")
    _model_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    serve.add_argument("--port", type=int, default=50051, help="0 picks a free port (default: 50051)")
    serve.add_argument("--chunk-bytes", type=int, default=1 << 20, help="largest response message (1 MiB)")
    serve.add_argument("--max-request-bytes", type=int, default=64 << 20, help="largest request (64 MiB)")
    serve.add_argument("--grace", type=float, default=10.0, help="seconds in-flight calls get at shutdown")
    serve.set_defaults(run=_serve)

    extract = commands.add_parser("extract", help="extract embeddings of images into files")
    extract.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
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
    extract.set_defaults(run=_extract)

    info = commands.add_parser("info", help="describe a running server's model")
    info.add_argument("--server", required=True, help="host:port")
    info.set_defaults(run=_info)

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
    from .server import ServerConfig, serve
    from .service import ServiceConfig

    config = ServerConfig(
        host=args.host,
        port=args.port,
        max_request_bytes=args.max_request_bytes,
        service=ServiceConfig(chunk_bytes=args.chunk_bytes),
        grace_seconds=args.grace,
    )
    asyncio.run(serve(config, _load_options(args)))
    return 0


def _extract(args: argparse.Namespace) -> int:
    outputs = list(args.outputs or (*DEFAULT_OUTPUTS, *(TOKEN_OUTPUTS if args.save_tokens else ())))
    outputs.append(IMAGE_GRID_THW)
    missing = [str(path) for path in args.images if not path.is_file()]
    if missing:
        print(f"error: no such image file: {', '.join(missing)}", file=sys.stderr)
        return 2
    stems = [path.stem for path in args.images]
    clashes = sorted({stem for stem in stems if stems.count(stem) > 1})
    if clashes:
        print(f"error: several images would write to the same folder: {', '.join(clashes)}", file=sys.stderr)
        return 2
    if args.server:
        with EmbeddingClient(args.server) as client:
            model = client.info().model
            for path in args.images:
                result = client.extract(
                    path, prompt=args.prompt, outputs=outputs, dtype=args.wire_dtype, normalize=args.normalize
                )
                _save(result, path, args, model)
        return 0
    from .decoding import decode_image
    from .extractor import Extractor
    from .loading import load_model

    options = _load_options(args)
    extractor = Extractor(load_model(options))
    plan = extractor.plan(outputs)
    for path in args.images:
        try:
            image = decode_image(path.read_bytes())
        except InvalidInputError as err:
            raise InvalidInputError(f"{path}: {err}") from err
        extraction = extractor.extract([image], args.prompt, plan, args.wire_dtype, args.normalize)
        _save(_as_embeddings(extraction), path, args, options.model)
    return 0


def _as_embeddings(extraction: Any) -> Embeddings:
    """The in-process result in the SDK's result type, so both paths save identically."""
    return Embeddings(
        tensors=extraction.tensors,
        visual_token_lens=extraction.visual_token_lens,
        image_grid_thw=extraction.image_grid_thw,
        image_token_positions=extraction.image_token_positions,
        sequence_length=extraction.sequence_length,
        request_id="",
    )


def _save(result: Embeddings, path: Path, args: argparse.Namespace, model: str) -> None:
    outdir = args.outdir / path.stem
    result.save(outdir, extra_manifest={"image": str(path), "prompt": args.prompt, "model": model})
    shapes = ", ".join(f"{name} {list(result[name].shape)}" for name in result.names)
    print(f"{path} -> {outdir}: {shapes}")


def _info(args: argparse.Namespace) -> int:
    with EmbeddingClient(args.server) as client:
        print(json.dumps(asdict(client.info()), indent=2))
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from .tiny_model import build_tiny_model

    print(build_tiny_model(args.outdir, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
