"""The images of a bulk job: a folder, a glob pattern, an image file, or a Parquet/CSV listing."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from qwen25vl_embed_server.core.model.image_formats import IMAGE_SUFFIXES

_LISTING_SUFFIXES = frozenset({".parquet", ".csv"})


def list_images(source: str, path_column: str = "path") -> list[str]:
    """The absolute paths of the images to process, in a stable order, each once.

    ``source`` is a folder (image files below it, by suffix, see
    :data:`~qwen25vl_embed_server.core.model.image_formats.IMAGE_SUFFIXES`), a Parquet or CSV file with
    a ``path_column`` (relative paths are relative to its folder), an image file, or a glob
    pattern (``**`` recurses; quote it in a shell).

    Raises:
        FileNotFoundError: ``source`` is neither an existing path nor a pattern.
        ValueError: the listing lacks ``path_column``.
    """
    path = Path(source)
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    elif path.is_file() and path.suffix.lower() in _LISTING_SUFFIXES:
        found = [str(path.parent / p) for p in _listed_paths(path, path_column)]
    elif path.is_file():
        found = [str(path)]
    elif any(char in source for char in "*?["):
        import glob

        found = sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
    else:
        raise FileNotFoundError(f"no such folder, file or pattern: {source}")
    return list(dict.fromkeys(os.path.abspath(p) for p in found))


def _listed_paths(listing: Path, column: str) -> list[str]:
    if listing.suffix.lower() == ".csv":
        table = pa_csv.read_csv(listing, convert_options=pa_csv.ConvertOptions(column_types={column: pa.string()}))
    else:
        table = pq.read_table(listing)
    if column not in table.column_names:
        raise ValueError(f"{listing} has no column {column!r} (columns: {', '.join(table.column_names)})")
    return [str(value) for value in table.column(column).to_pylist() if value]
