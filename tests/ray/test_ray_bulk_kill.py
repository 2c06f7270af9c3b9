"""A bulk job's driver SIGKILLed mid-run: its local Ray ends with it (no process left to write),
and a rerun completes the output with each image once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwen25vl_embed_server.core.model.loading import LoadOptions
from qwen25vl_embed_server.ray.bulk_job import BulkJob, run_bulk
from qwen25vl_embed_server.ray.parquet_format import iter_rows

from ..helpers import noise_image, png_bytes
from .sockets import descendants

# Enough small images that the job is far from done when its first file lands: 4 blocks of 100
# images, one actor, one image per model call.
IMAGES = 400
# Without the watchdog, Ray's dashboard and runtime-env agents outlived the driver by about a
# minute here (they poll for the raylet's end); with it, everything is gone within a second or two.
GONE_WITHIN_S = 20.0


def _process(pid: int) -> tuple[str, int] | None:
    """(state, start time) of ``pid``, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[19])


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()} if folder.exists() else {}


def _a_complete_file(folder: Path) -> bool:
    """Whether some Parquet file there is whole: Ray Data writes under the final name, so a file
    can be seen before its footer is written (and a kill then leaves no finished row)."""
    for file in folder.glob("*.parquet") if folder.exists() else ():
        try:
            pq.read_metadata(file)
        except (pa.ArrowException, OSError):
            continue
        return True
    return False


def test_a_killed_driver_takes_its_ray_with_it_and_a_rerun_completes_the_output(
    ray_cluster: None, tiny_model_path: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for index in range(IMAGES):
        (images / f"{index:04d}.png").write_bytes(png_bytes(noise_image(56, 56, seed=index)))
    output = tmp_path / "embeddings"
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # its own local Ray
    command = [sys.executable, "-m", "qwen25vl_embed_server.cli", "bulk", str(images), str(output)]
    command += ["--model", str(tiny_model_path), "--device", "cpu", "--dtype", "float32", "--batch-size", "1"]
    driver = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Every process of its Ray, seen while the driver runs: (pid, start time), so a reused pid is no match.
    seen: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 240
        while not _a_complete_file(output):
            assert driver.poll() is None, "the job ended before its first file"
            assert time.monotonic() < deadline, "no file in 240 s"
            for pid in descendants(driver.pid):
                if (found := _process(pid)) is not None:
                    seen.setdefault(pid, found[1])
            time.sleep(0.1)
        assert driver.poll() is None, "the job ended before it could be killed mid-run"
        driver.kill()
    finally:
        driver.kill()
        driver.wait()
    assert len(seen) > 5  # GCS, raylet, agents, the actor, workers

    def alive() -> list[int]:  # a zombie has ended: it writes nothing
        states = {pid: _process(pid) for pid in seen}
        return [pid for pid, state in states.items() if state and state[1] == seen[pid] and state[0] != "Z"]

    killed = time.monotonic()
    while alive() and time.monotonic() - killed < GONE_WITHIN_S:
        time.sleep(0.1)
    assert alive() == [], f"Ray processes still alive {GONE_WITHIN_S} s after the driver was killed"
    files = _files(output)
    time.sleep(1.0)
    assert _files(output) == files, "the output changed after every Ray process was gone"

    # The rerun (in this process, on the test's Ray) does only the rest: each image once, none missing.
    job = BulkJob(
        source=str(images),
        output=output,
        load=LoadOptions(model=str(tiny_model_path), device="cpu", dtype="float32"),
        batch_size=50,
    )
    report = run_bulk(job)
    assert report.skipped > 0, "the killed run should have written some rows"
    assert report.written == IMAGES - report.skipped
    paths = [row.path for row in iter_rows(output)]
    assert len(paths) == len(set(paths)) == IMAGES
    assert set(paths) == {str(path) for path in images.iterdir()}


@pytest.mark.parametrize("exists", [False, True])
def test_a_second_job_on_an_output_in_use_waits_then_fails(tmp_path: Path, exists: bool) -> None:
    from qwen25vl_embed_server.ray.bulk_lock import locked_output

    output = tmp_path / "out"
    if exists:
        output.mkdir()
    with (
        locked_output(output),
        pytest.raises(ValueError, match="in use by another bulk job"),
        locked_output(output, wait_s=0.3),
    ):
        pass
    with locked_output(output):  # released
        pass
    assert output.exists() == exists  # a folder it created and left empty is removed
