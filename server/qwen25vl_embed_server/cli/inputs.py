"""Command-line image inputs: files, folders and glob patterns -> image paths."""

from __future__ import annotations

import glob
from pathlib import Path

from qwen25vl_embed_server.core.model.image_formats import IMAGE_SUFFIXES


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; folders -> their image files (recursively, sorted, by
    :data:`~qwen25vl_embed_server.core.model.image_formats.IMAGE_SUFFIXES`); globs -> their matches.

    Raises :class:`FileNotFoundError` naming every input that matched nothing.
    """
    paths: list[Path] = []
    missing: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            paths.append(path)
        elif path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif matches := sorted(glob.glob(item, recursive=True)):
            paths += [Path(m) for m in matches if Path(m).is_file()]
        else:
            missing.append(item)
    if missing:
        raise FileNotFoundError(f"no such image file, folder or match: {', '.join(missing)}")
    return list(dict.fromkeys(paths))
