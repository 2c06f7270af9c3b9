"""Bulk extraction with Ray Data: image files in, Parquet out, the model loaded once per actor.

Input (:func:`list_images`): a folder (searched recursively for image files), a glob pattern, or a
Parquet or CSV file with a column of paths (relative ones are relative to that file's folder).

Output: a folder of Parquet files, one row per image, in plain Arrow types that any Parquet reader
understands (no Ray needed to read them; :func:`iter_rows` rebuilds the arrays):

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

Floating values are float32 whatever the model's dtype. A failed image (unreadable, corrupt,
refused by the processor) gets a row with ``error`` set and nulls elsewhere; other failures stop
the job.

Resumable: images whose path already has a row in the output folder are skipped, so rerunning
the same command after an interruption does only what is left. A Parquet file that cannot be
read (cut off by the interruption) is renamed ``_<name>.unreadable`` and its images run again.
Run one job per output folder at a time.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from .batcher import BatchingConfig
from .decoding import decode_image
from .errors import DeviceOutOfMemoryError, InvalidInputError
from .extractor import Extraction, Extractor, Prepared
from .limits import DEFAULT_MAX_PIXELS
from .loading import LoadOptions
from .outputs import IMAGE_GRID_THW, POOLED, VISUAL_TOKEN_LENS, plan_outputs
from .preprocess import DEFAULT_PROMPT

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".jp2", ".j2k", ".ppm", ".mpo"}
)
"""File name suffixes that a folder input picks up (case-insensitive)."""

_LISTING_SUFFIXES = frozenset({".parquet", ".csv"})
_METADATA = (VISUAL_TOKEN_LENS, IMAGE_GRID_THW)
# Rows per input block: a block is written as its own file(s), so this bounds what an interruption
# loses, while keeping the file count reasonable for millions of images.
_ROWS_PER_BLOCK = 256


@dataclass(frozen=True)
class BulkJob:
    """One bulk extraction.

    Attributes:
        source: a folder, a glob pattern, or a Parquet/CSV file listing paths (see :func:`list_images`).
        output: the Parquet folder (created; rows already there are kept and skipped).
        load: the model, as for ``qwen25vl-embed serve``.
        outputs: output names (empty: the pooled vectors); visual_token_lens and image_grid_thw
            are always written.
        prompt / normalize: as in ``ImageRequest``.
        batch_size: images per model call in an actor.
        actors: model copies (Ray actors).
        gpus_per_actor / cpus_per_actor: Ray resources of each actor. On the CPU, torch in each
            actor uses ``max(1, int(cpus_per_actor))`` threads.
        path_column: the column of a Parquet/CSV listing that holds the paths.
        max_batch_tokens: a model call's bound in tokens (vision patches, plus the sequence when
            the language model runs); a batch above it is split.
        max_pixels: the largest image accepted (width x height, checked before decoding); a
            larger one fails as in the server.
        address: the Ray cluster to join when Ray is not initialised yet (None: ``RAY_ADDRESS``,
            else a local cluster).
    """

    source: str
    output: Path
    load: LoadOptions
    outputs: tuple[str, ...] = ()
    prompt: str = DEFAULT_PROMPT
    normalize: bool = False
    batch_size: int = 16
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    path_column: str = "path"
    max_batch_tokens: int = field(default_factory=lambda: BatchingConfig().max_tokens)
    max_pixels: int = DEFAULT_MAX_PIXELS
    address: str | None = None


@dataclass(frozen=True)
class BulkReport:
    """What a run did: ``listed`` images, ``skipped`` (already in the output), ``written`` rows
    (``failed`` of them with an error), in ``seconds`` (actor start and model loading included)."""

    listed: int
    skipped: int
    written: int
    failed: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        if self.listed and self.skipped == self.listed:
            return f"nothing to do: all {self.listed} images are already in the output"
        return (
            f"{self.written} images written ({self.failed} failed), {self.skipped} already done, "
            f"in {self.seconds:.1f} s: {self.images_per_second:.2f} images/s"
        )


def run_bulk(job: BulkJob) -> BulkReport:
    """Extract every image of ``job.source`` not yet in ``job.output``; return what was done.

    Ray Data shows its progress bars while the job runs.

    Raises:
        ValueError: bad job settings, an unknown output name, or an unusable listing.
        FileNotFoundError: the source does not exist.
    """
    import ray
    from ray.data import ActorPoolStrategy

    if job.batch_size < 1 or job.actors < 1:
        raise ValueError("batch_size and actors must be at least 1")
    plan_outputs(job.outputs, sys.maxsize, sys.maxsize)  # unknown names fail here; layer ranges in the actors
    listed = list_images(job.source, job.path_column)
    done = finished_paths(job.output)
    todo = [path for path in listed if path not in done]
    log.info(
        "%d images listed, %d already in %s, %d to do", len(listed), len(listed) - len(todo), job.output, len(todo)
    )
    if not todo:
        return BulkReport(listed=len(listed), skipped=len(listed), written=0, failed=0, seconds=0.0)
    if not ray.is_initialized():
        ray.init(address=job.address)
    started = time.perf_counter()
    blocks = min(len(todo), max(4 * job.actors, math.ceil(len(todo) / _ROWS_PER_BLOCK)))
    paths = ray.data.from_items([{"path": path} for path in todo], override_num_blocks=blocks)
    rows = paths.map_batches(
        BulkEmbedder,
        fn_constructor_args=(job,),
        batch_size=job.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=job.actors),
        num_cpus=job.cpus_per_actor,
        num_gpus=job.gpus_per_actor or None,
    )
    job.output.mkdir(parents=True, exist_ok=True)
    # Writing is light; zero CPUs lets it run beside actors that hold every CPU of the cluster.
    rows.write_parquet(str(job.output), ray_remote_args={"num_cpus": 0})
    seconds = time.perf_counter() - started
    written, failed = _count_rows(job.output, set(todo))
    return BulkReport(
        listed=len(listed), skipped=len(listed) - len(todo), written=written, failed=failed, seconds=seconds
    )


class BulkEmbedder:
    """The Ray Data actor: loads the model once, then turns batches of paths into Arrow rows."""

    def __init__(self, job: BulkJob) -> None:
        import torch

        from .loading import load_model

        if job.gpus_per_actor == 0:
            torch.set_num_threads(max(1, int(job.cpus_per_actor)))
        self._job = job
        self._extractor = Extractor(load_model(job.load))
        self._plan = self._extractor.plan(job.outputs)
        self._schema = output_schema(self._plan.names)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        paths = [str(path) for path in batch["path"]]
        outcomes: list[Extraction | str] = ["" for _ in paths]
        prepared: list[tuple[int, Prepared]] = []
        for index, path in enumerate(paths):
            try:
                image = decode_image(Path(path).read_bytes(), 0, self._job.max_pixels)
                item = self._extractor.prepare([image], self._job.prompt, self._plan, "float32", self._job.normalize)
            except (InvalidInputError, OSError) as error:
                outcomes[index] = str(error)
            else:
                prepared.append((index, item))
        for chunk in _chunks(prepared, self._job.max_batch_tokens):
            for index, outcome in zip([i for i, _ in chunk], self._run([item for _, item in chunk]), strict=True):
                outcomes[index] = outcome
        return _table(paths, outcomes, self._schema)

    def _run(self, items: list[Prepared]) -> list[Extraction | str]:
        """One model call; when it fails (device memory, a rejected image), each item alone."""
        try:
            return list(self._extractor.run(items))
        except (InvalidInputError, DeviceOutOfMemoryError) as error:
            if len(items) == 1:
                return [str(error)]
        return [outcome for item in items for outcome in self._run([item])]


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
    results = [outcome if isinstance(outcome, Extraction) else None for outcome in outcomes]
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


def _chunks(items: list[tuple[int, Prepared]], max_tokens: int) -> Iterator[list[tuple[int, Prepared]]]:
    """Consecutive runs of ``items`` whose cost stays within ``max_tokens`` (at least one each)."""
    chunk: list[tuple[int, Prepared]] = []
    tokens = 0
    for entry in items:
        if chunk and tokens + entry[1].cost > max_tokens:
            yield chunk
            chunk, tokens = [], 0
        chunk.append(entry)
        tokens += entry[1].cost
    if chunk:
        yield chunk


def list_images(source: str, path_column: str = "path") -> list[str]:
    """The absolute paths of the images to process, in a stable order, each once.

    ``source`` is a folder (image files below it, by suffix, see :data:`IMAGE_SUFFIXES`), a
    Parquet or CSV file with a ``path_column`` (relative paths are relative to its folder), an
    image file, or a glob pattern (``**`` recurses; quote it in a shell).

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


def finished_paths(output: Path) -> set[str]:
    """The paths that already have a row in ``output``; unreadable files are set aside (renamed
    ``_<name>.unreadable``, which Parquet readers skip) so their images run again."""
    paths: set[str] = set()
    for path, _ in _scan(output):
        paths.add(path)
    return paths


def _count_rows(output: Path, paths: set[str]) -> tuple[int, int]:
    """Rows of ``output`` for ``paths``, and how many of them hold an error."""
    written = failed = 0
    for path, error in _scan(output):
        if path in paths:
            written += 1
            failed += error is not None
    return written, failed


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
