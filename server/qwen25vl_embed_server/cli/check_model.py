"""``qwen25vl-embed check-model PATH``: the first thing to run on a downloaded checkpoint.

Loads the folder (or hub id) exactly as ``serve`` would, strictly, prints what it found (the
architecture, the recipe and why, the sizes, the processor's pixel range, base and adapter, the
weights each file set filled) and runs one image and one text through it. Exit 0 when the server
would serve it, 2 with the reason on one line when it would not.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

import numpy as np

from qwen25vl_embed_server.cli.commands import load_options

if TYPE_CHECKING:
    from qwen25vl_embed_server.core.model.extractor import Extractor
    from qwen25vl_embed_server.core.model.finishing import Extraction

SAMPLE_TEXT = "a red bicycle leaning on a wall"
"""The text request the check runs."""


def check_model(args: argparse.Namespace) -> int:
    from PIL import Image

    from qwen25vl_embed_server.core.errors import InvalidInputError, ModelLoadError
    from qwen25vl_embed_server.core.model.extractor import Extractor
    from qwen25vl_embed_server.core.model.loading import load_model

    options = load_options(args)
    try:
        extractor = Extractor(load_model(options))
    except (ValueError, OSError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in describe(extractor):
        print(line)
    retrieval = extractor.info().recipe is not None
    # A gradient, not noise: an image of the size a photo has, made here (no file to ship).
    image = Image.linear_gradient("L").convert("RGB").resize((448, 336))
    try:
        runs = {
            "image": extractor.extract(
                [image], plan=extractor.plan(()), prompt_format="document" if retrieval else "chat"
            ),
            "text": extractor.extract(
                [],
                SAMPLE_TEXT,
                plan=extractor.plan((), has_images=False),
                prompt_format="query" if retrieval else "chat",
            ),
        }
    except (InvalidInputError, RuntimeError) as err:
        print(f"error: the model does not run: {err}", file=sys.stderr)
        return 2
    for kind, extraction in runs.items():
        if (problem := _not_finite(extraction)) is not None:
            print(f"error: one {kind} gives {problem}", file=sys.stderr)
            return 2
        print(f"one {kind}: {_shapes(extraction)}")
    print("ok: serve --model " + extractor.info().model)
    return 0


def describe(extractor: Extractor) -> list[str]:
    """What loading found, one fact a line."""
    loaded, info = extractor.loaded, extractor.info()
    config = loaded.model.config
    lines = [
        f"model: {info.model}",
        f"architecture: {', '.join(getattr(config, 'architectures', None) or [type(loaded.model).__name__])}"
        f" ({config.model_type})",
        f"device: {info.device}, dtype: {info.dtype}, arithmetic: {info.arithmetic}",
        f"sizes: vision {info.vision_hidden_size} x {info.num_vision_layers} blocks, "
        f"language model {info.hidden_size} x {info.num_lm_layers} layers",
        f"processor: {info.min_pixels} to {info.max_pixels} pixels per image, "
        f"patch {info.patch_size}, merge {info.spatial_merge_size}",
    ]
    report = loaded.report
    if report is None:
        return lines
    recipe = "none (raw states)" if report.recipe is None else report.recipe
    lines.append(f"recipe: {recipe} ({report.recipe_reason})")
    lines.append(f"base: {report.base}")
    if report.adapter is not None:
        lines.append(f"adapter: {report.adapter}")
    for check in report.weights:
        state = "every weight" if check.complete else check.problem()
        lines.append(f"weights ({check.kind} {check.source}): {check.matched} matched; {state}")
    return lines


def _shapes(extraction: Extraction) -> str:
    return ", ".join(f"{name} {list(array.shape)}" for name, array in extraction.tensors.items())


def _not_finite(extraction: Extraction) -> str | None:
    for name, array in extraction.tensors.items():
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array.astype(np.float32)).all():
            return f"values that are not finite in {name}"
    return None
