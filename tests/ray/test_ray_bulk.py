"""Ray Data bulk extraction on the CPU, the tiny model: Parquet rows equal the plain client's
results, ragged token tensors keep their shapes, and reruns only do what is left."""

from __future__ import annotations

import csv
import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwen25vl_embed import EmbeddingClient
from qwen25vl_embed_server.cli import main
from qwen25vl_embed_server.core.admission.limits import Limits
from qwen25vl_embed_server.core.model.loading import LoadOptions
from qwen25vl_embed_server.ray.bulk_job import BulkJob, run_bulk
from qwen25vl_embed_server.ray.bulk_listing import list_images
from qwen25vl_embed_server.ray.parquet_format import finished_paths, iter_rows

from ..helpers import applies_here, noise_image, png_bytes

# Token tensors of different first axes per image (ragged) and a 3-d one, plus pooled vectors.
OUTPUTS = ("vision_tokens", "projected_tokens", "lm_last_hidden", "lm_image_pooled_mean", "lm_last_token")
SIZES = [(56, 56), (224, 112), (140, 84), (28, 280), (112, 112), (84, 140)]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six images of different sizes, a corrupt one, and a file that is not an image."""
    folder = tmp_path_factory.mktemp("bulk-images")
    (folder / "nested").mkdir()
    for index, (width, height) in enumerate(SIZES):
        where = folder / "nested" if index % 2 else folder
        (where / f"image{index}.png").write_bytes(png_bytes(noise_image(width, height, seed=index)))
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "notes.txt").write_text("not listed: not an image suffix")
    return folder


def test_rows_equal_the_clients_results_and_reruns_do_only_the_rest(
    ray_cluster: None,
    images: Path,
    tiny_model_path: Path,
    client: EmbeddingClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = tmp_path / "embeddings"
    # First run: a CSV listing of three images (relative paths), the corrupt one and a broken
    # file that gets fixed before the second run; two actors.
    fixed = tmp_path / "fixed.png"
    fixed.write_bytes(b"\x89PNG\r\n\x1a\n cut off")
    listing = tmp_path / "listing.csv"
    listed = [images / "image0.png", images / "nested/image1.png", images / "image2.png", images / "corrupt.png"]
    with listing.open("w", newline="") as file:
        csv.writer(file).writerows([["path"], *[[str(path)] for path in [*listed, fixed]]])
    job = BulkJob(
        source=str(listing),
        output=output,
        load=LoadOptions(model=str(tiny_model_path), device="cpu", dtype="float32"),
        outputs=OUTPUTS,
        batch_size=2,
        actors=2,
    )
    first = run_bulk(job)
    assert (first.listed, first.skipped, first.written, first.failed) == (5, 0, 5, 2)
    assert sorted(path for path, _ in first.failures) == sorted([str(fixed), str(images / "corrupt.png")])
    assert first.images_per_second > 0
    clean_files = {
        path.name: path.stat().st_mtime_ns
        for path in output.glob("*.parquet")
        if pq.read_table(path, columns=["error"]).column("error").null_count == pq.read_metadata(path).num_rows
    }

    # Second run, through the CLI: every image and the fixed file. The three new images run, and
    # the two that failed run again (their old rows removed): the fixed file now has its vectors.
    fixed.write_bytes(png_bytes(noise_image(70, 42, seed=9)))
    everything = tmp_path / "everything.csv"
    with everything.open("w", newline="") as file:
        csv.writer(file).writerows([["path"], *[[str(path)] for path in [*images.rglob("*.png"), fixed]]])
    arguments = ["bulk", str(everything), str(output), "--model", str(tiny_model_path), "--device", "cpu"]
    arguments += ["--dtype", "float32", "--outputs", *OUTPUTS, "--batch-size", "4"]
    assert main(arguments) == 1  # an image failed
    printed = capsys.readouterr()
    assert "5 images written (1 failed) (2 failed before, retried), 3 already done" in printed.out
    failures = [line for line in printed.err.splitlines() if line.startswith("failed: ")]  # with its message
    assert len(failures) == 1
    assert failures[0].startswith(f"failed: {images / 'corrupt.png'}: ")
    assert "could not be decoded" in failures[0]
    assert {name: mtime for name, mtime in clean_files.items() if (output / name).exists()} == clean_files

    rows = {row.path: row for row in iter_rows(output)}
    assert sorted(rows) == sorted([*(os.path.abspath(path) for path in images.rglob("*.png")), str(fixed)])
    assert sum(1 for _ in iter_rows(output)) == len(rows)  # no image twice
    corrupt = rows.pop(str(images / "corrupt.png"))
    assert corrupt.error is not None
    assert "could not be decoded" in corrupt.error
    assert corrupt.tensors == {}
    shapes = set()
    for path, row in rows.items():
        assert row.error is None
        expected = client.extract(Path(path).read_bytes(), outputs=[*OUTPUTS, "image_grid_thw"])
        assert row.visual_token_lens == int(expected.visual_token_lens[0])
        assert row.image_grid_thw == tuple(expected.image_grid_thw[0].tolist())
        assert row.sequence_length == expected.sequence_length
        assert set(row.tensors) == set(OUTPUTS)
        for name in OUTPUTS:
            assert row.tensors[name].shape == expected[name].shape, name
            np.testing.assert_allclose(row.tensors[name], expected[name], rtol=1e-5, atol=1e-5, err_msg=name)
        shapes.add(row.tensors["projected_tokens"].shape)
    assert len(shapes) > 1, "the images should give ragged token tensors"

    # Plain Arrow types, readable without Ray: vectors are lists of floats, token tensors values + shape.
    table = pq.read_table(output)
    assert table.schema.field("lm_last_token").type == pa.list_(pa.float32())
    assert table.schema.field("projected_tokens").type == pa.large_list(pa.float32())
    row = next(r for r in table.to_pylist() if r["error"] is None)
    tokens = np.asarray(row["projected_tokens"], np.float32).reshape(row["projected_tokens_shape"])
    assert tokens.shape == (row["visual_token_lens"], 64)

    # Third run, failed images kept (--skip-failed): nothing left, nothing written, no Ray job.
    third = run_bulk(BulkJob(source=str(images), output=output, load=job.load, outputs=OUTPUTS, retry_failed=False))
    assert (third.listed, third.skipped, third.written) == (7, 7, 0)


def test_a_prompt_over_the_token_limit_fails_each_image_as_in_the_server(
    ray_cluster: None, images: Path, tiny_model_path: Path, tmp_path: Path
) -> None:
    # Few characters (under the character bound), more tokens than the limit: the token check decides.
    prompt = "one two three four five six seven eight"
    job = BulkJob(
        source=f"{images}/image[02].png",
        output=tmp_path / "embeddings",
        load=LoadOptions(model=str(tiny_model_path), device="cpu", dtype="float32"),
        prompt=prompt,
        batch_size=2,
        limits=Limits(max_prompt_tokens=3),
    )
    assert len(prompt) <= job.limits.max_prompt_chars
    report = run_bulk(job)
    assert (report.listed, report.written, report.failed) == (2, 2, 2)
    rows = list(iter_rows(job.output))
    assert sorted(row.path for row in rows) == [str(images / "image0.png"), str(images / "image2.png")]
    for row in rows:
        assert row.error is not None
        assert "tokens; the limit is max_prompt_tokens=3" in row.error
        assert row.tensors == {}


def test_listing_a_glob_a_parquet_file_and_refusals(images: Path, tmp_path: Path) -> None:
    pngs = sorted(str(path) for path in images.rglob("*.png"))
    assert list_images(str(images)) == pngs
    assert list_images(f"{images}/**/image*.png") == sorted(p for p in pngs if "image" in Path(p).name)
    listing = tmp_path / "listing.parquet"
    pq.write_table(pa.table({"file": ["image0.png", "image0.png", None, "nested/image1.png"]}), listing)
    copy = tmp_path / "image0.png"
    copy.write_bytes((images / "image0.png").read_bytes())
    (tmp_path / "nested").mkdir()
    assert list_images(str(listing), path_column="file") == [str(copy), str(tmp_path / "nested" / "image1.png")]
    with pytest.raises(ValueError, match="no column 'path'"):
        list_images(str(listing))
    with pytest.raises(FileNotFoundError):
        list_images(str(tmp_path / "missing"))


def test_an_unreadable_output_file_is_set_aside(tmp_path: Path) -> None:
    pq.write_table(pa.table({"path": ["/a.png"], "error": pa.array([None], pa.string())}), tmp_path / "good.parquet")
    (tmp_path / "cut.parquet").write_bytes(b"PAR1 cut off by an interruption")
    assert finished_paths(tmp_path) == {"/a.png"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["_cut.parquet.unreadable", "good.parquet"]
    pq.write_table(pa.table({"file": ["/b.png"]}), tmp_path / "someone-elses.parquet")
    with pytest.raises(ValueError, match="not a bulk job's output"):
        finished_paths(tmp_path)
    assert (tmp_path / "someone-elses.parquet").exists()


def test_bulk_asking_for_gpus_the_cluster_lacks_fails_in_one_line(
    ray_cluster: None, images: Path, tiny_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the check, Ray Data waits forever for actors that need 4 GPUs on a CPU-only cluster."""
    argv = ["bulk", str(images), str(tmp_path / "out"), "--model", str(tiny_model_path), "--num-gpus", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: bulk asks for 4 GPUs (--num-gpus); the Ray cluster has 0: "
        "use fewer, or --num-gpus 0 with --actors to run on CPUs\n"
    )
    assert not (tmp_path / "out").exists()


def test_rays_workers_start_without_torch_so_mkl_dispatch_applies_there(ray_cluster: None) -> None:
    """The replica's and the bulk actors' processes are Ray workers: they load torch only through
    our package, which sets MKL's dispatch first (core/cpu/mkl_dispatch.py), as in ``serve``."""
    import ray

    # A runtime env of its own: a fresh worker process, never one an earlier task left with torch.
    @ray.remote(num_cpus=0, runtime_env={"env_vars": {"QWEN25VL_EMBED_PROBE": uuid.uuid4().hex}})
    def probe() -> tuple[bool, bool, str]:
        import sys

        loaded_before = "torch" in sys.modules
        from qwen25vl_embed_server.core.cpu import mkl_dispatch

        state = mkl_dispatch.state()
        return loaded_before, state.applied, state.reason

    loaded_before, applied, reason = ray.get(probe.remote(), timeout=120)
    assert loaded_before is False
    assert applied is applies_here(), reason
