"""The CLI as a new user meets it (issue 12): layouts that mirror the input tree, flags that cannot
apply refused, errors checked once and up front, Ctrl-C and resuming, one-line start-up errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qwen25vl_embed import Embeddings
from qwen25vl_embed_server.cli import main
from qwen25vl_embed_server.cli.layout import output_folders
from qwen25vl_embed_server.rpc.harness import BackgroundServer

from ..helpers import noise_image


def _photos(root: Path, count: int, side: int = 56) -> list[Path]:
    paths = []
    for i in range(count):
        path = root / f"{2023 + i % 2}" / f"IMG_{i // 2:04d}.JPG"
        path.parent.mkdir(parents=True, exist_ok=True)
        noise_image(side, side, seed=i).save(path, format="PNG")
        paths.append(path)
    return paths


def _manifests(outdir: Path) -> list[str]:
    return sorted(str(p.parent.relative_to(outdir)) for p in outdir.rglob("manifest.json"))


def test_repeated_names_in_a_tree_are_mirrored_under_outdir(tmp_path: Path, server: BackgroundServer) -> None:
    _photos(tmp_path / "photos", 4)  # 2023/IMG_0000.JPG and 2024/IMG_0000.JPG, ...
    outdir = tmp_path / "out"
    assert main(["extract", str(tmp_path / "photos"), "--outdir", str(outdir), "--server", server.address]) == 0
    assert _manifests(outdir) == ["2023/IMG_0000", "2023/IMG_0001", "2024/IMG_0000", "2024/IMG_0001"]
    manifest = json.loads((outdir / "2024" / "IMG_0001" / "manifest.json").read_text())
    # Absolute paths, and the normalisation: what a reader of the folder needs to know.
    assert manifest["image"] == str(tmp_path / "photos" / "2024" / "IMG_0001.JPG")
    assert manifest["normalize"] is False
    assert manifest["arithmetic"] == "exact"  # the values are transformers' own (fp32 on the CPU)


def test_output_folders_name_every_clash_on_a_large_tree() -> None:
    paths = [Path(f"/data/{year}/IMG_{i:05d}.JPG") for year in (2023, 2024, 2025) for i in range(1000)]
    folders = output_folders(paths, Path("out"))
    assert folders[0] == Path("out/2023/IMG_00000")
    assert folders[-1] == Path("out/2025/IMG_00999")
    clashing = [*paths, Path("/data/2024/IMG_00007.png"), Path("/data/2025/IMG_00042.jpeg")]
    with pytest.raises(ValueError, match="several images would write to the same folder") as caught:
        output_folders(clashing, Path("out"))
    message = str(caught.value)
    flat = output_folders([Path("/d/2023/a.png"), Path("/d/2024/nested/b.png")], Path("out"), flat=True)
    assert flat == [Path("out/a"), Path("out/b")]
    with pytest.raises(ValueError, match=r"out/IMG_00000: /data/2023/IMG_00000\.JPG, /data/2024/IMG_00000\.JPG, "):
        output_folders(paths, Path("out"), flat=True)
    assert "out/2024/IMG_00007: /data/2024/IMG_00007.JPG, /data/2024/IMG_00007.png" in message
    assert "out/2025/IMG_00042: /data/2025/IMG_00042.JPG, /data/2025/IMG_00042.jpeg" in message


def test_pixel_range_flags_reach_the_server_and_model_flags_are_refused(
    tmp_path: Path, server: BackgroundServer, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "big.png"
    noise_image(448, 448).save(image)
    outdir = tmp_path / "out"
    argv = ["extract", str(image), "--outdir", str(outdir), "--server", server.address]
    assert main([*argv, "--max-pixels", str(224 * 224)]) == 0
    assert json.loads((outdir / "big" / "manifest.json").read_text())["visual_token_lens"] == [64]  # not 256
    capsys.readouterr()
    for flags in (["--dtype", "bfloat16"], ["--device", "cpu"], ["--recipe", "colqwen2.5"], ["--image-tokens-only"]):
        assert main([*argv, *flags]) == 2
        assert f"{flags[0]} choose" in capsys.readouterr().err
    assert main([*argv, "--max-pixels", "99999999999"]) == 1  # beyond the server's cap: refused by it
    assert "outside the server's range" in capsys.readouterr().err


def test_in_process_extract_of_a_folder_shows_progress(
    tmp_path: Path, tiny_model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _photos(tmp_path / "photos", 11, side=28)
    argv = ["extract", str(tmp_path / "photos"), "--outdir", str(tmp_path / "out"), "--model", str(tiny_model_path)]
    assert main([*argv, "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "11/11" in err  # the bar's final state
    assert "11 of 11 images saved" in err


def test_a_wrong_output_name_is_reported_once_before_any_work(
    tmp_path: Path, server: BackgroundServer, capsys: pytest.CaptureFixture[str]
) -> None:
    _photos(tmp_path / "photos", 12)
    argv = ["extract", str(tmp_path / "photos"), "--outdir", str(tmp_path / "out"), "--outputs", "lm_last_tokn"]
    # In-process, before the model loads: this model path does not exist, and is never opened.
    assert main([*argv, "--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert err.count("unknown output 'lm_last_tokn'") == 1
    assert "no-model" not in err
    # Through a server: the server's output list is asked once; no image is sent.
    assert main([*argv, "--server", server.address]) == 2
    assert capsys.readouterr().err.count("lm_last_tokn") == 1
    layer = ["extract", str(tmp_path / "photos"), "--outputs", "lm_layer_99", "--server", server.address]
    assert main(layer) == 2
    assert capsys.readouterr().err.count("lm_layer_99") == 1
    # A layer counted from the end is valid, though the server's output list names layers from 0.
    last = ["extract", str(tmp_path / "photos" / "2023" / "IMG_0000.JPG"), "--outputs", "lm_layer_-1"]
    assert main([*last, "--outdir", str(tmp_path / "last"), "--server", server.address]) == 0
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "last" / "IMG_0000" / "lm_layer_-1.npy").is_file()


def test_ctrl_c_says_what_was_saved_and_skip_existing_goes_on(
    tmp_path: Path, server: BackgroundServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _photos(tmp_path / "photos", 5)
    outdir = tmp_path / "out"
    argv = ["extract", str(tmp_path / "photos"), "--outdir", str(outdir), "--server", server.address]
    save = Embeddings.save
    calls = []

    def interrupted_on_the_third(self: Embeddings, *args: object, **kwargs: object) -> Path:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the third result is being written
        return save(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Embeddings, "save", interrupted_on_the_third)
    assert main(argv) == 130
    assert "interrupted: 2 of 5 images saved to" in capsys.readouterr().err
    monkeypatch.setattr(Embeddings, "save", save)
    done = {name: (outdir / name / "manifest.json").stat().st_mtime_ns for name in _manifests(outdir)}
    assert len(done) == 2

    assert main([*argv, "--skip-existing"]) == 0
    err = capsys.readouterr().err
    assert "5 of 5 images saved to" in err
    assert "(2 already there)" in err
    assert len(_manifests(outdir)) == 5
    assert {name: (outdir / name / "manifest.json").stat().st_mtime_ns for name in done} == done  # not redone
    # Other outputs than the saved ones: those folders are not complete for this run.
    assert main([*argv, "--skip-existing", "--save-tokens"]) == 0
    assert all(
        "projected_tokens" in json.loads((outdir / name / "manifest.json").read_text())["files"]
        for name in _manifests(outdir)
    )


def test_small_cli_surprises(
    tmp_path: Path, server: BackgroundServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A host without a port would silently dial 443.
    assert main(["info", "--server", "localhost"]) == 2
    assert "give host:port (e.g. localhost:50051)" in capsys.readouterr().err
    # No images: say where, and which files count.
    (tmp_path / "empty").mkdir()
    assert main(["extract", str(tmp_path / "empty"), "--server", server.address]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err
    assert ".jpg" in err
    assert ".png" in err

    # `info | head`: the reader left; no traceback, the exit code of a shell's SIGPIPE.
    class ClosedPipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["info", "--server", server.address]) == 141


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dtype", "half"], "error: unknown dtype 'half'; expected auto, float32, float16, bfloat16\n"),
        (["--device", "cuda:99"], "error: device 'cuda:99': "),
        (["--device", "tpu"], "error: unknown device 'tpu'"),
    ],
    ids=["dtype", "device-not-here", "device-unknown"],
)
def test_serve_refuses_a_bad_device_or_dtype_in_one_line_before_listening(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--model", "tiny-random", "--port", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message), err
    assert err.count("\n") == 1, err


def test_serve_of_a_model_that_cannot_load_ends_in_one_line_and_exit_2() -> None:
    """A hub id with the hub offline, in a real process: its stderr is what the user sees, after
    the server had started listening (the event loop closes with nothing left on it)."""
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    argv = [
        sys.executable,
        "-m",
        "qwen25vl_embed_server.cli",
        "serve",
        "--port",
        "0",
        "--model",
        "nobody/no-such-model",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if " INFO " not in line]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: cannot load model 'nobody/no-such-model': "), done.stderr
    assert "Traceback" not in done.stderr
    assert "Event loop is closed" not in done.stderr


def test_wait_flag_waits_for_a_ready_server_and_gives_up_on_a_missing_one(
    server: BackgroundServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", "--server", server.address, "--wait", "30"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == server.service.calls.pipeline.info().model
    assert main(["info", "--server", "127.0.0.1:1", "--wait", "0.3"]) == 1
    assert "DEADLINE_EXCEEDED: the server at 127.0.0.1:1 was not ready within 0.3 s" in capsys.readouterr().err


def test_a_relative_model_path_is_recorded_absolute(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "cat.png"
    noise_image(28, 28).save(image)
    monkeypatch.chdir(tiny_model_path.parent)
    argv = ["extract", str(image), "--outdir", str(tmp_path / "out"), "--model", tiny_model_path.name]
    assert main([*argv, "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "out" / "cat" / "manifest.json").read_text())["model"] == str(tiny_model_path)
