"""The on-disk format of a bulk job's output: a folder of Parquet files, one row per image.

Plain Arrow types that any Parquet reader understands (no Ray needed to read them;
:func:`iter_rows` rebuilds the arrays):

==========================  =====================  ==========================================
column                      type                   value
==========================  =====================  ==========================================
``path``                    string                 the image's absolute path
``error``                   string                 why the image failed (null when it did not)
``visual_token_lens``       int64                  Nv, the image's image tokens
``image_grid_thw``          list<int64>            (t, h, w) patch grid
``sequence_length``         int64                  T
``<pooled output>``         list<float32>          the vector (``[1, C]`` output, flattened)
``<token output>``          large_list<float32>    the values, row-major
``<token output>_shape``    list<int64>            their shape, e.g. ``[Nv, D]`` (ragged)
==========================  =====================  ==========================================

Floating values are float32 whatever the model's dtype. A failed image (unreadable, corrupt, over
a limit, refused by the processor) gets a row with ``error`` set and nulls elsewhere.

Reading the folder back for a rerun (:func:`finished_paths`): a Parquet file that cannot be read
(cut off by an interruption) is renamed ``_<name>.unreadable``, which Parquet readers skip. The
error rows of images run again are removed first (:func:`drop_failed_rows`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qwen25vl_embed_server.core.model.outputs import IMAGE_GRID_THW, POOLED, VISUAL_TOKEN_LENS

if TYPE_CHECKING:  # reading the output needs no torch
    from qwen25vl_embed_server.core.model.finishing import Extraction

log = logging.getLogger(__name__)

_METADATA = (VISUAL_TOKEN_LENS, IMAGE_GRID_THW)


def output_schema(names: Sequence[str]) -> pa.Schema:
    """The Arrow schema of the rows for outputs ``names`` (see the module docstring)."""
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field(VISUAL_TOKEN_LENS, pa.int64()),
        pa.field(IMAGE_GRID_THW, pa.list_(pa.int64())),
        pa.field("sequence_length", pa.int64()),
    ]
    for name in names:
        if name in _METADATA:
            continue
        if name in POOLED:
            fields.append(pa.field(name, pa.list_(pa.float32())))
        else:
            fields.append(pa.field(name, pa.large_list(pa.float32())))
            fields.append(pa.field(f"{name}_shape", pa.list_(pa.int64())))
    return pa.schema(fields)


def _table(paths: list[str], outcomes: list[Extraction | str], schema: pa.Schema) -> pa.Table:
    """The rows of ``paths``: an outcome is the image's extraction, or the error message."""
    results = [None if isinstance(outcome, str) else outcome for outcome in outcomes]
    columns: dict[str, pa.Array] = {
        "path": pa.array(paths, pa.string()),
        "error": pa.array([outcome if isinstance(outcome, str) else None for outcome in outcomes], pa.string()),
        VISUAL_TOKEN_LENS: pa.array(
            [None if r is None else int(r.visual_token_lens.sum()) for r in results], pa.int64()
        ),
        IMAGE_GRID_THW: _lists([None if r is None else r.image_grid_thw for r in results], pa.list_(pa.int64())),
        "sequence_length": pa.array([None if r is None else r.sequence_length for r in results], pa.int64()),
    }
    for column in schema:
        if column.name in columns or column.name.endswith("_shape"):
            continue
        arrays = [None if r is None else r.tensors[column.name] for r in results]
        columns[column.name] = _lists(arrays, column.type)
        if column.name not in POOLED:
            shapes = [None if a is None else np.asarray(a.shape, np.int64) for a in arrays]
            columns[f"{column.name}_shape"] = _lists(shapes, pa.list_(pa.int64()))
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)


def _lists(arrays: Sequence[np.ndarray | None], type_: pa.DataType) -> pa.Array:
    """A list column: each array flattened row-major into one row; None is a null row."""
    numpy_type = type_.value_type.to_pandas_dtype()
    lengths = np.asarray([0 if a is None else a.size for a in arrays], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64 if pa.types.is_large_list(type_) else np.int32)
    present = [np.asarray(a, numpy_type).reshape(-1) for a in arrays if a is not None]
    values = np.concatenate(present) if present else np.empty(0, numpy_type)
    mask = pa.array([a is None for a in arrays], pa.bool_())
    array_class = pa.LargeListArray if pa.types.is_large_list(type_) else pa.ListArray
    return array_class.from_arrays(pa.array(offsets), pa.array(values), type=type_, mask=mask)


def finished_paths(output: Path, *, retry_failed: bool = False) -> set[str]:
    """The paths that already have a row in ``output`` (with ``retry_failed``: a row without an
    error); unreadable files are set aside (renamed ``_<name>.unreadable``, which Parquet readers
    skip) so their images run again."""
    return {path for path, error in _scan(output) if not (retry_failed and error is not None)}


def drop_failed_rows(output: Path, paths: set[str]) -> int:
    """Remove the error rows of ``paths`` from ``output``'s files (each file rewritten beside
    itself, then renamed over itself, so a reader sees the file before or after, never half); returns how
    many were removed. Done before those images run again, so an interruption at any point leaves
    each image with one row or none: none runs again on the next rerun."""
    removed = 0
    for file in sorted(output.glob("*.parquet")):
        table = pq.read_table(file)
        keep = [
            not (error is not None and path in paths)
            for path, error in zip(table.column("path").to_pylist(), table.column("error").to_pylist(), strict=True)
        ]
        if all(keep):
            continue
        removed += keep.count(False)
        if any(keep):
            scratch = file.with_name(f"_{file.name}.rewrite")
            pq.write_table(table.filter(pa.array(keep)), scratch)
            scratch.replace(file)
        else:
            file.unlink()
    return removed


def rows_of(output: Path, paths: set[str]) -> tuple[int, list[tuple[str, str]]]:
    """How many rows ``output`` has for ``paths``, and the (path, error) of those that failed."""
    written = 0
    failures = []
    for path, error in _scan(output):
        if path in paths:
            written += 1
            if error is not None:
                failures.append((path, error))
    return written, failures


def _scan(output: Path) -> Iterator[tuple[str, str | None]]:
    if not output.exists():
        return
    if not output.is_dir():
        raise ValueError(f"the output {output} is not a folder")
    for file in sorted(output.glob("*.parquet")):
        try:
            columns = pq.read_schema(file).names
            if "path" in columns and "error" in columns:
                table = pq.read_table(file, columns=["path", "error"])
        except (pa.ArrowException, OSError) as error:
            aside = file.with_name(f"_{file.name}.unreadable")
            log.warning("%s cannot be read (%s); renamed to %s, its images run again", file, error, aside.name)
            file.rename(aside)
            continue
        if "path" not in columns or "error" not in columns:
            raise ValueError(f"{file} is not a bulk job's output (no path and error columns); choose another folder")
        yield from zip(table.column("path").to_pylist(), table.column("error").to_pylist(), strict=True)


@dataclass(frozen=True)
class BulkRow:
    """One row of a bulk job's output, arrays rebuilt: ``tensors`` maps each output to a float32
    array of its shape (pooled vectors ``[1, C]``, as from the service); empty when ``error``."""

    path: str
    error: str | None
    visual_token_lens: int | None
    image_grid_thw: tuple[int, ...] | None
    sequence_length: int | None
    tensors: dict[str, np.ndarray]


def iter_rows(output: Path | str) -> Iterator[BulkRow]:
    """Every row of a bulk job's output folder, file by file."""
    for file in sorted(Path(output).glob("*.parquet")):
        table = pq.read_table(file)
        names = [name for name in table.column_names if name in POOLED or f"{name}_shape" in table.column_names]
        for row in range(table.num_rows):
            values: dict[str, Any] = {name: table.column(name)[row] for name in table.column_names}
            tensors = {}
            if values["error"].as_py() is None:
                for name in names:
                    array = values[name].values.to_numpy(zero_copy_only=False)
                    shape = values[f"{name}_shape"].as_py() if name not in POOLED else [1, len(array)]
                    tensors[name] = array.reshape(shape)
            grid = values[IMAGE_GRID_THW].as_py()
            yield BulkRow(
                path=values["path"].as_py(),
                error=values["error"].as_py(),
                visual_token_lens=values[VISUAL_TOKEN_LENS].as_py(),
                image_grid_thw=None if grid is None else tuple(grid),
                sequence_length=values["sequence_length"].as_py(),
                tensors=tensors,
            )
