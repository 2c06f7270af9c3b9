"""Bulk extraction with Ray Data: image files in, Parquet out, the model loaded once per actor.

Input (:func:`~qwen25vl_embed_server.ray.bulk_listing.list_images`): a folder (searched
recursively for image files), a glob pattern, or a Parquet or CSV file with a column of paths
(relative ones are relative to that file's folder).

Output: a folder of Parquet files, one row per image: its path, an ``error`` (null unless the
image failed), the image's metadata and one column per output, in plain Arrow types; the columns
are described in :mod:`~qwen25vl_embed_server.ray.parquet_format`, and
:func:`~qwen25vl_embed_server.ray.parquet_format.iter_rows` rebuilds the arrays. Each image gets
the server's checks (:attr:`BulkJob.limits`); a failed image (unreadable, corrupt, over a limit,
refused by the processor) gets a row with ``error`` set; other failures stop the job.

Resumable: images whose path already has a row in the output folder are skipped, so rerunning
the same command after an interruption does only what is left; images whose row is an error run
again (their old row removed first), unless :attr:`BulkJob.retry_failed` is off. A Parquet file
that cannot be read (cut off by the interruption) is renamed ``_<name>.unreadable`` and its
images run again. One job per output folder at a time
(:mod:`~qwen25vl_embed_server.ray.bulk_lock`; a second one waits, then fails); a local Ray the
job starts ends with the driver, SIGKILL included (:mod:`~qwen25vl_embed_server.ray.watchdog`).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qwen25vl_embed_server.core.admission.limits import Limits
from qwen25vl_embed_server.core.model.loading import LoadOptions
from qwen25vl_embed_server.core.model.outputs import plan_outputs
from qwen25vl_embed_server.core.retrieval.layout import detect_recipe, find_layout
from qwen25vl_embed_server.ray.bulk_actor import BulkExtractionActor
from qwen25vl_embed_server.ray.bulk_listing import list_images
from qwen25vl_embed_server.ray.bulk_lock import locked_output
from qwen25vl_embed_server.ray.local import init_ray
from qwen25vl_embed_server.ray.parquet_format import drop_failed_rows, finished_paths, rows_of

log = logging.getLogger(__name__)

# Rows per input block: a block is written as its own file(s), so this bounds what an interruption
# loses, while keeping the file count reasonable for millions of images.
_ROWS_PER_BLOCK = 256


@dataclass(frozen=True)
class BulkJob:
    """One bulk extraction.

    Attributes:
        source: a folder, a glob pattern, or a Parquet/CSV file listing paths (see
            :func:`~qwen25vl_embed_server.ray.bulk_listing.list_images`).
        output: the Parquet folder (created; rows already there are kept and skipped).
        load: the model, as for ``qwen25vl-embed serve``.
        outputs: output names (empty: the pooled vectors); visual_token_lens and image_grid_thw
            are always written.
        prompt / normalize: as in ``ImageRequest`` (prompt None: the chat format's default; the
            document format takes none).
        prompt_format: "chat", "raw", "document" (the retrieval recipe's document template, the
            vectors ``embed_images`` returns), or "auto": "document" when the model, or ``adapter``,
            has a retrieval recipe, else "chat".
        batch_size: images per model call in an actor.
        actors: model copies (Ray actors).
        gpus_per_actor / cpus_per_actor: Ray resources of each actor. On the CPU, torch in each
            actor uses ``max(1, int(cpus_per_actor))`` threads.
        path_column: the column of a Parquet/CSV listing that holds the paths.
        max_batch_tokens: a model call's bound in tokens (vision patches, plus the sequence when
            the language model runs); a batch above it is split. None: the server's default for
            the actor's device (:meth:`~qwen25vl_embed_server.core.scheduling.batcher.BatchingConfig.tokens_for`).
        limits: the per-image limits, as in the server (one image per request): image bytes,
            ``max_pixels`` (checked before decoding), prompt tokens; an image over one fails.
        address: the Ray cluster to join when Ray is not initialised yet (None: ``RAY_ADDRESS``,
            else a local cluster).
        retry_failed: run again the images whose row in the output is an error (a file fixed
            since is picked up); off: keep those rows and skip the images.
        adapter: the retrieval adapter every image runs with, by name (one of ``load.adapters``;
            "": the model's own).
        task: the recipe's task every image runs with (jina-embeddings-v4; "": its default).
    """

    source: str
    output: Path
    load: LoadOptions
    outputs: tuple[str, ...] = ()
    prompt: str | None = None
    prompt_format: str = "auto"
    normalize: bool = False
    batch_size: int = 16
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    path_column: str = "path"
    max_batch_tokens: int | None = None
    limits: Limits = field(default_factory=Limits)
    address: str | None = None
    retry_failed: bool = True
    adapter: str = ""
    task: str = ""


@dataclass(frozen=True)
class BulkReport:
    """What a run did: ``listed`` images, ``skipped`` (already in the output), ``written`` rows
    (``failed`` of them with an error: ``failures`` holds their paths and messages), in
    ``seconds`` (actor start and model loading included); ``retried``: images whose earlier row
    was an error, run again."""

    listed: int
    skipped: int
    written: int
    failed: int
    seconds: float
    retried: int = 0
    failures: tuple[tuple[str, str], ...] = ()

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        if self.listed and self.skipped == self.listed:
            return f"nothing to do: all {self.listed} images are already in the output"
        retried = f" ({self.retried} failed before, retried)" if self.retried else ""
        return (
            f"{self.written} images written ({self.failed} failed){retried}, {self.skipped} already done, "
            f"in {self.seconds:.1f} s: {self.images_per_second:.2f} images/s"
        )


def check_gpus(job: BulkJob, resources: Mapping[str, float]) -> None:
    """Refuse a job that asks for more GPUs than the cluster has: Ray would wait for them forever.
    (An autoscaling cluster that could add them is joined with the GPUs it has now.)"""
    wanted = job.gpus_per_actor * job.actors
    have = float(resources.get("GPU", 0.0))
    if wanted > have:
        raise ValueError(
            f"bulk asks for {wanted:g} GPUs (--num-gpus); the Ray cluster has {have:g}: "
            "use fewer, or --num-gpus 0 with --actors to run on CPUs"
        )


def check_prompt_format(job: BulkJob) -> None:
    """Refuse, before Ray starts, a prompt that prompt format ``auto`` would send in the document
    format: the model is a retrieval checkpoint (its recipe read from the local folder's files, or
    asked for with ``--recipe``) or the job names an adapter (every adapter has a recipe). A hub id
    is not read here: its actors refuse the combination as they load it.

    Raises:
        ValueError: one line naming ``--prompt``, ``--prompt-format auto`` and the model.
    """
    if job.prompt is None or job.prompt_format != "auto":
        return
    which = f"--adapter {job.adapter}" if job.adapter else _retrieval_checkpoint(job.load)
    if which:
        raise ValueError(
            f"--prompt with --prompt-format auto, which is document for {which}: the recipe's document template "
            "has no prompt; drop --prompt, or give --prompt-format chat"
        )


def _retrieval_checkpoint(load: LoadOptions) -> str:
    """What makes ``load`` a retrieval model, in a few words ("": not one, or not known before loading)."""
    if load.recipe not in ("auto", "none"):
        return f"--recipe {load.recipe}"
    if load.recipe == "none" or load.adapters or not Path(load.model).is_dir():
        return ""
    layout = find_layout(load.model)
    try:
        recipe = detect_recipe(layout)[0] if layout is not None else None
    except ValueError:  # a checkpoint that contradicts itself: loading says so, naming the statements
        return ""
    return f"the {recipe} checkpoint {load.model}" if recipe else ""


def run_bulk(job: BulkJob) -> BulkReport:
    """Extract every image of ``job.source`` not yet in ``job.output``; return what was done.

    Ray Data shows its progress bars while the job runs.

    Raises:
        ValueError: bad job settings, an unknown output name, or an unusable listing.
        FileNotFoundError: the source does not exist.
    """
    if job.batch_size < 1 or job.actors < 1:
        raise ValueError("batch_size and actors must be at least 1")
    check_prompt_format(job)
    plan_outputs(job.outputs, sys.maxsize, sys.maxsize)  # unknown names fail here; layer ranges in the actors
    listed = list_images(job.source, job.path_column)
    with locked_output(job.output) as lock:
        return _run_locked(job, listed, lock)


def _run_locked(job: BulkJob, listed: list[str], lock: int) -> BulkReport:
    import ray
    from ray.data import ActorPoolStrategy

    done = finished_paths(job.output, retry_failed=job.retry_failed)
    todo = [path for path in listed if path not in done]
    log.info(
        "%d images listed, %d already in %s, %d to do", len(listed), len(listed) - len(todo), job.output, len(todo)
    )
    if not todo:
        return BulkReport(listed=len(listed), skipped=len(listed), written=0, failed=0, seconds=0.0)
    if not ray.is_initialized():
        init_ray(job.address, hold=(lock,))  # a local Ray stays on 127.0.0.1 and ends with this process
    check_gpus(job, ray.cluster_resources())
    started = time.perf_counter()
    # Their old error rows go first: killed from here on, each image has one row or none.
    retried = drop_failed_rows(job.output, set(todo)) if job.retry_failed else 0
    blocks = min(len(todo), max(4 * job.actors, math.ceil(len(todo) / _ROWS_PER_BLOCK)))
    paths = ray.data.from_items([{"path": path} for path in todo], override_num_blocks=blocks)
    rows = paths.map_batches(
        BulkExtractionActor,
        fn_constructor_args=(job,),
        batch_size=job.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=job.actors),
        num_cpus=job.cpus_per_actor,
        num_gpus=job.gpus_per_actor or None,
    )
    # Writing is light; zero CPUs lets it run beside actors that hold every CPU of the cluster.
    rows.write_parquet(str(job.output), ray_remote_args={"num_cpus": 0})
    seconds = time.perf_counter() - started
    written, failures = rows_of(job.output, set(todo))
    return BulkReport(
        listed=len(listed),
        skipped=len(listed) - len(todo),
        written=written,
        failed=len(failures),
        seconds=seconds,
        retried=retried,
        failures=tuple(failures),
    )
