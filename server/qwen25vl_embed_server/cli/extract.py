"""``qwen25vl-embed extract``: images (files, folders, globs) -> ``<outdir>/<image_stem>/`` files.

Through a server, many images go over one ExtractBatch stream (``--concurrency`` in flight) with a
progress bar; in-process, the model runs here one image at a time, like the original script. A bad
image is reported and skipped; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen25vl_embed import EmbeddingClient, Embeddings
from qwen25vl_embed_server.cli.commands import client_of, load_options
from qwen25vl_embed_server.cli.flags import uses_client_security
from qwen25vl_embed_server.cli.inputs import expand_inputs
from qwen25vl_embed_server.core.errors import InvalidInputError
from qwen25vl_embed_server.core.outputs import DEFAULT_OUTPUTS, IMAGE_GRID_THW, TOKEN_OUTPUTS

if TYPE_CHECKING:
    from qwen25vl_embed_server.core.loading import LoadOptions
# Up to this many images, one line per image; beyond, a progress bar and a summary.
_VERBOSE_UP_TO = 10


def extract(args: argparse.Namespace) -> int:
    """``qwen25vl-embed extract``: the exit code."""
    outputs = list(args.outputs or (*DEFAULT_OUTPUTS, *(TOKEN_OUTPUTS if args.save_tokens else ())))
    outputs.append(IMAGE_GRID_THW)
    if not args.server and uses_client_security(args):
        print("error: the TLS and token flags need --server", file=sys.stderr)
        return 2
    try:
        return run_extract(args, outputs, lambda: client_of(args), lambda: load_options(args))
    except (ValueError, OSError) as err:  # unreadable TLS or token files
        print(f"error: {err}", file=sys.stderr)
        return 2


def run_extract(
    args: argparse.Namespace,
    outputs: list[str],
    make_client: Callable[[], EmbeddingClient],
    load_options: Callable[[], LoadOptions],
) -> int:
    """Extract every input image and save it; returns the exit code.

    ``make_client`` (with --server) and ``load_options`` (without) are called only when needed,
    so the client path never imports torch.
    """
    try:
        paths = expand_inputs(args.images)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not paths:
        print("error: no images found", file=sys.stderr)
        return 2
    stems = [path.stem for path in paths]
    clashes = sorted({stem for stem in stems if stems.count(stem) > 1})
    if clashes:
        print(f"error: several images would write to the same folder: {', '.join(clashes)}", file=sys.stderr)
        return 2
    saver = _Saver(args, verbose=len(paths) <= _VERBOSE_UP_TO)
    if args.server:
        with make_client() as client:
            saver.model = client.info().model
            results = client.extract_many(
                paths,
                prompt=args.prompt,
                outputs=outputs,
                dtype=args.wire_dtype,
                normalize=args.normalize,
                concurrency=args.concurrency,
                progress=not saver.verbose,
                errors="return",
            )
            for path, result in zip(paths, results, strict=True):
                saver.save(path, result)
    else:
        options = load_options()
        saver.model = options.model
        for path, outcome in zip(paths, _extract_here(args, options, outputs, paths), strict=True):
            saver.save(path, outcome)
    return saver.finish(len(paths))


def _extract_here(
    args: argparse.Namespace, options: LoadOptions, outputs: list[str], paths: list[Path]
) -> Iterator[Embeddings | Exception]:
    """In-process, one image at a time: the original script's way, through the same request checks
    and preparation as the server (at the default limits)."""
    from qwen25vl_embed_server.core.extractor import Extractor
    from qwen25vl_embed_server.core.limits import Limits
    from qwen25vl_embed_server.core.loading import load_model
    from qwen25vl_embed_server.core.request import EncodedRequest, prepare_request

    extractor = Extractor(load_model(options))
    plan = extractor.plan(outputs)
    limits = Limits()
    for index, path in enumerate(paths):
        request = EncodedRequest(
            images=[path.read_bytes()],
            prompt=args.prompt,
            outputs=outputs,
            dtype=args.wire_dtype,
            normalize=args.normalize,
        )
        try:
            extraction = extractor.run([prepare_request(extractor, request, limits, plan)])[0]
        except InvalidInputError as err:
            yield err
            continue
        yield Embeddings(
            tensors=extraction.tensors,
            visual_token_lens=extraction.visual_token_lens,
            image_grid_thw=extraction.image_grid_thw,
            image_token_positions=extraction.image_token_positions,
            sequence_length=extraction.sequence_length,
            request_id=str(index),  # as extract_many tags requests: the position in the run
        )


class _Saver:
    """Writes each result in the original layout and reports failures without stopping."""

    def __init__(self, args: argparse.Namespace, verbose: bool) -> None:
        self.args = args
        self.verbose = verbose
        self.model = ""
        self.failed = 0

    def save(self, path: Path, result: Embeddings | Exception) -> None:
        if not isinstance(result, Embeddings):
            self.failed += 1
            print(f"error: {path}: {result}", file=sys.stderr)
            return
        outdir = self.args.outdir / path.stem
        manifest: dict[str, Any] = {"image": str(path), "prompt": self.args.prompt, "model": self.model}
        result.save(outdir, extra_manifest=manifest)
        if self.verbose:
            shapes = ", ".join(f"{name} {list(result[name].shape)}" for name in result.names)
            print(f"{path} -> {outdir}: {shapes}")

    def finish(self, total: int) -> int:
        done = total - self.failed
        if not self.verbose or self.failed:
            print(f"{done} of {total} images extracted to {self.args.outdir}/", file=sys.stderr)
        return 1 if self.failed else 0
