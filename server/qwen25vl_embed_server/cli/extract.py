"""``qwen25vl-embed extract``: images (files, folders, globs) -> one folder of files per image.

The output mirrors the input tree under ``--outdir`` (:mod:`~qwen25vl_embed_server.cli.layout`).
Through a server, many images go over one ExtractBatch stream (``--concurrency`` in flight); in-process,
the model runs here one image at a time, like the original script. Beyond a few images a progress
bar shows either way. ``--prompt-format`` (:mod:`~qwen25vl_embed_server.cli.prompt_format_flags`): on a
retrieval model, by default, the recipe's document vectors, as ``embed_images``. A bad image is
reported and skipped; the exit code is then 1. Ctrl-C says what was saved; ``--skip-existing``
goes on from there.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen25vl_embed import EmbeddingClient, Embeddings
from qwen25vl_embed.extract_many import progress_bar
from qwen25vl_embed_server.cli import prompt_format_flags
from qwen25vl_embed_server.cli.adapter_flags import adapter_name_of
from qwen25vl_embed_server.cli.commands import client_of, load_options, server_info, target_error
from qwen25vl_embed_server.cli.flags import uses_client_security
from qwen25vl_embed_server.cli.inputs import expand_inputs
from qwen25vl_embed_server.cli.layout import is_complete, output_folders
from qwen25vl_embed_server.core import defaults
from qwen25vl_embed_server.core.errors import InvalidInputError, ModelLoadError
from qwen25vl_embed_server.core.model.image_formats import IMAGE_SUFFIXES
from qwen25vl_embed_server.core.model.outputs import (
    DEFAULT_OUTPUTS,
    IMAGE_GRID_THW,
    TOKEN_OUTPUTS,
    check_output_names,
    plan_outputs,
)

if TYPE_CHECKING:
    from qwen25vl_embed_server.core.model.loading import LoadOptions
# Up to this many images, one line per image; beyond, a progress bar and a summary.
_VERBOSE_UP_TO = 10


def extract(args: argparse.Namespace) -> int:
    """``qwen25vl-embed extract``: the exit code."""
    outputs = list(args.outputs or (*DEFAULT_OUTPUTS, *(TOKEN_OUTPUTS if args.save_tokens else ())))
    outputs.append(IMAGE_GRID_THW)
    problem = _flag_problem(args)
    if problem is None:
        try:  # names no model has: refused before any model loads or any image is sent
            check_output_names(outputs)
        except InvalidInputError as err:
            problem = str(err)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        return run_extract(args, outputs, lambda: client_of(args), lambda: load_options(args))
    except (ValueError, OSError, ModelLoadError) as err:  # unreadable TLS or token files; the model
        print(f"error: {err}", file=sys.stderr)
        return 2


def _flag_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags taken together, or None."""
    adapters = args.adapter or []
    if (problem := prompt_format_flags.flag_problem(args)) is not None:
        return problem
    if len(adapters) > 1:
        return "extract runs with one --adapter"
    if adapters and args.server and "=" in adapters[0]:
        return f"--adapter {adapters[0]}: with --server, name one of the server's adapters (NAME, not NAME=PATH)"
    if adapters and not args.server and "=" not in adapters[0]:
        return f"--adapter {adapters[0]}: in-process, give the adapter as NAME=PATH (or name a server's with --server)"
    if not args.server:
        if uses_client_security(args) or args.wait:
            return "--wait and the TLS and token flags need --server"
        return None
    # The server's model, device and dtype are the server's: these flags would be silently ignored.
    ignored = [
        flag
        for flag, value, default in (
            ("--dtype", args.dtype, defaults.DEFAULT_DTYPE),
            ("--device", args.device, defaults.DEFAULT_DEVICE),
            ("--recipe", args.recipe, "auto"),
            ("--pooling", args.pooling, None),
            ("--image-tokens-only", args.image_tokens_only, False),
            ("--allow-partial-weights", args.allow_partial_weights, False),
        )
        if value != default
    ]
    if ignored:
        return f"{' and '.join(ignored)} choose how the server runs its model; not with --server (see `serve --help`)"
    return target_error(args.server)


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
        suffixes = " ".join(sorted(IMAGE_SUFFIXES))
        print(f"error: no images found in {', '.join(args.images)} (image files end in {suffixes})", file=sys.stderr)
        return 2
    try:
        folders = output_folders(paths, args.outdir, flat=args.flat)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    todo = list(zip(paths, folders, strict=True))
    if args.skip_existing:
        todo = [(path, folder) for path, folder in todo if not is_complete(folder, outputs)]
    saver = _Saver(args, total=len(paths), skipped=len(paths) - len(todo))
    todo_paths = [path for path, _ in todo]
    try:
        if not todo:
            pass
        elif args.server:
            with make_client() as client:
                info = server_info(client, args.wait)
                adapter = adapter_name_of(args.adapter[0] if args.adapter else None)
                recipe = next((a.recipe for a in info.adapters if a.name == adapter), info.recipe)
                try:  # the server's own check, on its model's depth: once, rather than once per image
                    served = (recipe.output, "multi_vector") if recipe and recipe.tasks and recipe.head else None
                    retrieval = served or (recipe.output if recipe else None)
                    plan_outputs(outputs, info.num_lm_layers, info.num_vision_layers, retrieval=retrieval)
                except InvalidInputError as err:
                    print(f"error: {err} (server {args.server})", file=sys.stderr)
                    return 2
                saver.model, saver.arithmetic = info.model, info.arithmetic
                try:
                    prompt_format = prompt_format_flags.resolve(args, has_recipe=recipe is not None)
                except ValueError as err:
                    print(f"error: {err} (server {args.server})", file=sys.stderr)
                    return 2
                saver.prompt_format = prompt_format
                results = client.extract_many(
                    todo_paths,
                    prompt=prompt_format_flags.prompt_for(args, prompt_format),
                    prompt_format=prompt_format,
                    outputs=outputs,
                    dtype=args.wire_dtype,
                    normalize=args.normalize,
                    concurrency=args.concurrency,
                    progress=not saver.verbose,
                    errors="return",
                    min_pixels=args.min_pixels,
                    max_pixels=args.max_pixels,
                    adapter=adapter,
                    task=args.task,
                )
                for (path, folder), result in zip(todo, results, strict=True):
                    saver.save(path, folder, result)
        else:
            options = load_options()
            saver.model = options.model
            bar = progress_bar(not saver.verbose, len(todo))
            try:
                for (path, folder), outcome in zip(
                    todo, _extract_here(args, options, outputs, todo_paths, saver), strict=True
                ):
                    saver.save(path, folder, outcome)
                    if bar is not None:
                        bar.update(1)
            finally:
                if bar is not None:
                    bar.close()
    except KeyboardInterrupt:
        print(f"interrupted: {saver.summary()}; rerun with --skip-existing to go on", file=sys.stderr)
        return 130
    return saver.finish()


def _extract_here(
    args: argparse.Namespace, options: LoadOptions, outputs: list[str], paths: list[Path], saver: _Saver
) -> Iterator[Embeddings | Exception]:
    """In-process, one image at a time: the original script's way, through the same request checks
    and preparation as the server (at the default limits). Tells ``saver`` the model's arithmetic."""
    from qwen25vl_embed_server.core.admission.limits import Limits
    from qwen25vl_embed_server.core.admission.request import EncodedRequest, prepare_request
    from qwen25vl_embed_server.core.model.extractor import Extractor
    from qwen25vl_embed_server.core.model.finishing import serving
    from qwen25vl_embed_server.core.model.loading import load_model
    from qwen25vl_embed_server.core.model.output_settings import OutputSettings

    extractor = Extractor(load_model(options))
    saver.arithmetic = extractor.loaded.arithmetic
    # The in-process model has the flags' pixel range already: no per-request range here.
    adapter = options.adapters[0].name if options.adapters else ""
    plan = extractor.plan(outputs, adapter=adapter or None)
    prompt_format = prompt_format_flags.resolve(args, has_recipe=serving(extractor.loaded, adapter)[0] is not None)
    saver.prompt_format = prompt_format
    limits = Limits()
    for index, path in enumerate(paths):
        request = EncodedRequest(
            images=[path.read_bytes()],
            prompt=prompt_format_flags.prompt_for(args, prompt_format),
            outputs=outputs,
            settings=OutputSettings(dtype=args.wire_dtype, normalize=args.normalize),
            prompt_format=prompt_format,
            adapter=adapter,
            task=args.task,
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
    """Writes each result in its folder and reports failures without stopping."""

    def __init__(self, args: argparse.Namespace, total: int, skipped: int) -> None:
        self.args = args
        self.total = total
        self.skipped = skipped
        self.verbose = total - skipped <= _VERBOSE_UP_TO
        self.model = ""
        self.arithmetic = ""  # Info's: how close the values are to transformers' (unknown: not recorded)
        self.prompt_format = "chat"  # the format the requests carry, once resolved
        self.saved = 0
        self.failed = 0

    def save(self, path: Path, folder: Path, result: Embeddings | Exception) -> None:
        if not isinstance(result, Embeddings):
            self.failed += 1
            print(f"error: {path}: {result}", file=sys.stderr)
            return
        manifest: dict[str, Any] = {"normalize": self.args.normalize}
        if self.arithmetic:
            manifest["arithmetic"] = self.arithmetic
        manifest["prompt_format"] = self.prompt_format
        prompt = self.args.prompt
        if prompt is None and self.prompt_format == "chat":
            prompt = defaults.DEFAULT_PROMPT
        result.save(folder, manifest, image=path, prompt=prompt, model=self.model)
        self.saved += 1
        if self.verbose:
            shapes = ", ".join(f"{name} {list(result[name].shape)}" for name in result.names)
            print(f"{path} -> {folder}: {shapes}")

    def summary(self) -> str:
        done = self.saved + self.skipped
        already = f" ({self.skipped} already there)" if self.skipped else ""
        return f"{done} of {self.total} images saved to {self.args.outdir}/{already}"

    def finish(self) -> int:
        if not self.verbose or self.failed or self.skipped:
            print(self.summary(), file=sys.stderr)
        return 1 if self.failed else 0
