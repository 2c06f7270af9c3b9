"""The CLI: extract in-process and through a server writes the same files; serve runs and stops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qwen25vl_embed import EmbeddingClient
from qwen25vl_embed_server.cli import main
from qwen25vl_embed_server.rpc.harness import BackgroundServer, ServerProcess

from ..helpers import assert_batched_close, noise_image


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / "cat.png", tmp_path / "wide.jpg"]
    noise_image(300, 200, seed=1).save(paths[0])
    noise_image(448, 224, seed=2).save(paths[1], quality=95)
    return paths


def _tree(root: Path) -> dict[str, object]:
    """Every file under ``root``: arrays for .npy, parsed JSON for manifests."""
    files: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix == ".npy":
            files[str(path.relative_to(root))] = np.load(path)
        elif path.suffix == ".json":
            files[str(path.relative_to(root))] = json.loads(path.read_text())
    return files


def test_extract_local_and_via_server_write_the_same_files(
    tmp_path: Path,
    images: list[Path],
    tiny_model_path: Path,
    server: BackgroundServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    common = [*map(str, images), "--save-tokens", "--prompt", "A photo."]
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert main(["extract", *common, "--outdir", str(local), "--model", str(tiny_model_path), "--device", "cpu"]) == 0
    assert main(["extract", *common, "--outdir", str(remote), "--server", server.address]) == 0
    printed = capsys.readouterr().out
    assert "projected_tokens [128, 64]" in printed  # 448x224 -> 16x32 patches -> 128 tokens

    local_files, remote_files = _tree(local), _tree(remote)
    assert set(local_files) == set(remote_files)
    assert {"cat/manifest.json", "cat/projected_tokens.npy", "wide/lm_last_hidden.npy"} <= set(local_files)
    for name, value in local_files.items():
        other = remote_files[name]
        if isinstance(value, np.ndarray):
            # In-process runs each image alone; the server may batch them: equal as batching promises.
            assert_batched_close(np.asarray(other), value, name)
        else:
            manifest = dict(value)  # type: ignore[call-overload]
            other_manifest = dict(other)  # type: ignore[call-overload]
            # The model is named by path locally and by the server's --model remotely: the same here.
            assert manifest == other_manifest, name

    manifest = json.loads((local / "cat" / "manifest.json").read_text())
    assert manifest["prompt"] == "A photo."
    assert manifest["arithmetic"] == "exact"
    assert manifest["image"] == str(images[0])
    for name, entry in manifest["files"].items():
        saved = np.load(local / "cat" / entry["file"])
        assert list(saved.shape) == entry["shape"], name


def test_extract_saves_pooled_vectors_only_by_default(
    tmp_path: Path, images: list[Path], server: BackgroundServer
) -> None:
    assert main(["extract", str(images[0]), "--outdir", str(tmp_path), "--server", server.address]) == 0
    saved = {p.name for p in (tmp_path / "cat").iterdir()}
    assert "lm_pooled_mean.npy" in saved
    assert "visual_token_lens.npy" in saved
    assert "projected_tokens.npy" not in saved


def test_extract_refuses_missing_files_and_names_clashing_paths(
    tmp_path: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["extract", str(tmp_path / "missing.png"), "--server", "127.0.0.1:1"]) == 2
    # cat.png and cat.jpg in one folder would both write <outdir>/cat/: refused, both named.
    twin = tmp_path / "cat.jpg"
    noise_image(56, 56).save(twin)
    assert main(["extract", str(tmp_path), "--server", "127.0.0.1:1", "--outdir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'out' / 'cat'}: {twin}, {images[0]}" in err
    assert not (tmp_path / "out").exists()


def test_extract_reports_a_bad_image_cleanly(
    tmp_path: Path, server: BackgroundServer, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert main(["extract", str(bad), "--outdir", str(tmp_path), "--server", server.address]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_serve_command_serves_and_exits_cleanly_on_sigterm(tiny_model_path: Path) -> None:
    """The real `serve` process: SERVING once loaded (ServerProcess waits for it), exit 0 on SIGTERM."""
    server = ServerProcess(["--model", str(tiny_model_path), "--device", "cpu"]).start()
    try:
        with EmbeddingClient(server.address) as client:
            assert client.info().model == str(tiny_model_path)
            assert client.extract(noise_image(56, 56)).visual_token_lens.tolist() == [4]
    finally:
        assert server.stop() == 0


def test_extract_takes_folders_and_globs_and_skips_bad_images(
    tmp_path: Path, server: BackgroundServer, client: EmbeddingClient, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for i in range(12):
        noise_image(56 + 14 * i, 56, seed=i).save(folder / ("nested" if i % 2 else ".") / f"img{i:02d}.png")
    (folder / "notes.txt").write_text("not an image: ignored by suffix")
    (folder / "broken.png").write_bytes(b"not a png")
    outdir = tmp_path / "out"
    code = main(["extract", str(folder), "--outdir", str(outdir), "--server", server.address, "--concurrency", "3"])
    assert code == 1  # broken.png failed, the others were saved
    err = capsys.readouterr().err
    assert "broken.png" in err
    assert "12 of 13 images" in err
    # The output mirrors the input tree, relative to the folder given.
    expected = sorted(f"nested/img{i:02d}" if i % 2 else f"img{i:02d}" for i in range(12))
    assert sorted(str(p.parent.relative_to(outdir)) for p in outdir.rglob("manifest.json")) == expected
    # Each result landed in its own image's folder.
    for path in sorted(folder.rglob("img*.png")):
        saved = np.load(outdir / path.relative_to(folder).with_suffix("") / "lm_last_token.npy")
        assert_batched_close(saved, client.extract(path)["lm_last_token"])

    globbed = tmp_path / "globbed"
    pattern = str(folder / "**" / "img0[0-3].png")
    assert main(["extract", pattern, "--outdir", str(globbed), "--server", server.address]) == 0
    found = sorted(str(p.parent.relative_to(globbed)) for p in globbed.rglob("manifest.json"))
    assert found == ["img00", "img02", "nested/img01", "nested/img03"]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("x" * 9000, "prompt has 9000 tokens; the limit is max_prompt_tokens=8192"),
        ("look: <|image_pad|>", "reserved for images and videos"),
    ],
    ids=["too-many-tokens", "reserved-token"],
)
def test_in_process_extract_checks_the_prompt_as_the_server_does(
    tmp_path: Path,
    images: list[Path],
    tiny_model_path: Path,
    capsys: pytest.CaptureFixture[str],
    prompt: str,
    message: str,
) -> None:
    argv = ["extract", str(images[0]), "--prompt", prompt, "--outdir", str(tmp_path / "out")]
    assert main([*argv, "--model", str(tiny_model_path), "--device", "cpu"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "cat").exists()
