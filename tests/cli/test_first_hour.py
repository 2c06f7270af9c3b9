"""The CLI as a new user meets it: layouts that mirror the input tree, flags that cannot apply
refused, errors checked once and up front, Ctrl-C and resuming, one-line start-up errors, a machine
without the hub, the tiny retrieval models, quiet progress at ``--log-level warning``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from qwen25vl_embed import Embeddings
from qwen25vl_embed_server.cli import main
from qwen25vl_embed_server.cli.app import build_parser
from qwen25vl_embed_server.cli.commands import load_options
from qwen25vl_embed_server.cli.layout import output_folders
from qwen25vl_embed_server.core import defaults
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.core.model.loading import load_model
from qwen25vl_embed_server.rpc.harness import BackgroundServer
from qwen25vl_embed_server.rpc.server import ListenError, check_bindable

from ..helpers import noise_image, server_config

REPO = Path(__file__).resolve().parents[2]


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
    model_flags = (["--dtype", "bfloat16"], ["--device", "cpu"], ["--recipe", "colqwen2.5"], ["--image-tokens-only"])
    for flags in (*model_flags, ["--allow-partial-weights"]):
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


# A CLI run in a child process with the model's libraries imported before the clock starts, so that
# what is timed is the command (loading, or failing to), not importing torch on a busy machine. The
# seconds it took are the last line of its stdout.
_TIMED_MAIN = """
import sys, time
import qwen25vl_embed_server.core.model.loading
from qwen25vl_embed_server.cli import main
started = time.monotonic()
code = main(sys.argv[1:])
print(f"{time.monotonic() - started:.2f}")
sys.exit(code)
"""
# The hub must not keep a command waiting longer than this (its own request timeout is 10 s).
_PATIENCE_SECONDS = 20.0


def _run_timed(argv: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    done = subprocess.run(
        [sys.executable, "-c", _TIMED_MAIN, *argv], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    return done, float(done.stdout.splitlines()[-1]) if done.stdout.strip() else float("inf")


def _hub_env(home: Path, endpoint: str) -> dict[str, str]:
    """This environment with the Hugging Face settings replaced: the hub at ``endpoint`` (on
    127.0.0.1: no traffic leaves the machine, whatever its network), its cache under ``home``,
    online mode and the libraries' own timeouts, no proxy."""
    settings = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(settings) and "proxy" not in k.lower()}
    return {**env, "HF_HOME": str(home), "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}


@pytest.fixture
def refusing_hub() -> Iterator[str]:
    """The address of a hub that refuses connections at once, as a host without a route or a name
    resolver does: a port bound (so that nobody else takes it) where nothing listens."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{bound.getsockname()[1]}"


@pytest.fixture
def silent_hub() -> Iterator[str]:
    """The address of a hub that never answers, as behind a firewall that drops packets: the
    kernel accepts the connection; nobody reads the request."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        yield f"http://127.0.0.1:{listening.getsockname()[1]}"


class _NotFound(BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self.do_HEAD()

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def empty_hub() -> Iterator[str]:
    """The address of a hub that answers, and has none of the files asked for."""
    with ThreadingHTTPServer(("127.0.0.1", 0), _NotFound) as hub:
        threading.Thread(target=hub.serve_forever, daemon=True).start()
        yield f"http://127.0.0.1:{hub.server_address[1]}"
        hub.shutdown()


def _assert_names_the_way_out(line: str, model: str, endpoint: str) -> None:
    assert line.startswith(f"error: cannot load model '{model}': the hub at {endpoint} cannot be reached ("), line
    assert line.endswith(
        "and the model is not in the hub cache here; without the hub, give a local checkpoint folder or "
        "'tiny-random' as the model, or HF_HUB_OFFLINE=1 with it in the hub cache"
    ), line


def test_extract_without_the_hub_fails_at_once_naming_the_way_out(tmp_path: Path, refusing_hub: str) -> None:
    image = tmp_path / "cat.png"
    noise_image(56, 56).save(image)
    argv = ["extract", str(image), "--outdir", str(tmp_path / "out")]  # the default model, a hub id
    done, seconds = _run_timed(argv, _hub_env(tmp_path / "hf", refusing_hub))
    assert done.returncode == 2, done.stderr[-3000:]
    assert seconds < _PATIENCE_SECONDS, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr[-3000:]  # no retry warnings, no traceback
    _assert_names_the_way_out(lines[0], defaults.DEFAULT_MODEL, refusing_hub)
    assert not (tmp_path / "out").exists()


def test_serve_with_a_hub_that_never_answers_gives_up_within_seconds(tmp_path: Path, silent_hub: str) -> None:
    argv = ["--log-level", "warning", "serve", "--port", "0"]
    done, seconds = _run_timed(argv, _hub_env(tmp_path / "hf", silent_hub))
    assert done.returncode == 2, done.stderr[-3000:]
    assert seconds < _PATIENCE_SECONDS, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    _assert_names_the_way_out(lines[0], defaults.DEFAULT_MODEL, silent_hub)
    assert "Timeout" in lines[0] or "no answer within" in lines[0], lines[0]


def test_a_hub_that_answers_is_left_to_say_what_it_lacks(tmp_path: Path, empty_hub: str) -> None:
    image = tmp_path / "cat.png"
    noise_image(56, 56).save(image)
    argv = ["extract", str(image), "--outdir", str(tmp_path / "out"), "--model", "someone/missing"]
    done, seconds = _run_timed(argv, _hub_env(tmp_path / "hf", empty_hub))
    assert done.returncode == 2, done.stderr[-3000:]
    assert seconds < _PATIENCE_SECONDS, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("error: cannot load model 'someone/missing': "), lines[0]
    assert "cannot be reached" not in lines[0]  # transformers' own account of the missing repository


def test_a_model_in_the_hub_cache_loads_without_the_hub(
    tmp_path: Path, tiny_model_path: Path, refusing_hub: str
) -> None:
    # The hub cache's own layout, as a download leaves it: refs/main names the snapshot.
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    image = tmp_path / "cat.png"
    noise_image(56, 56).save(image)
    argv = ["extract", str(image), "--outdir", str(tmp_path / "out"), "--model", "someone/tiny", "--device", "cpu"]
    done, seconds = _run_timed(argv, _hub_env(tmp_path / "hf", refusing_hub))
    assert done.returncode == 0, done.stderr[-3000:]
    assert seconds < _PATIENCE_SECONDS, done.stderr[-3000:]
    assert "loading someone/tiny from the hub cache" in done.stderr
    assert "Retrying" not in done.stderr  # no file is asked of the hub again
    assert json.loads((tmp_path / "out" / "cat" / "manifest.json").read_text())["model"] == "someone/tiny"


@pytest.mark.parametrize(("recipe", "output"), [("colqwen2.5", "multi_vector"), ("biqwen2.5", "single_vector")])
def test_make_tiny_model_builds_a_retrieval_model_that_serve_loads(
    recipe: str, output: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["make-tiny-model", str(tmp_path / "tiny"), "--recipe", recipe]) == 0
    folder = capsys.readouterr().out.strip()
    assert folder == str(tmp_path / "tiny" / "adapter")  # the folder to serve; the base beside it
    assert (tmp_path / "tiny" / "base" / "config.json").is_file()
    args = build_parser().parse_args(["serve", "--model", folder, "--device", "cpu"])
    loaded = load_model(load_options(args))  # as serve loads it: the recipe detected
    assert loaded.recipe is not None
    assert (loaded.recipe.name, loaded.recipe.output) == (recipe, output)


def test_the_search_example_runs_as_the_readme_says_on_the_tiny_colqwen(tmp_path: Path) -> None:
    assert main(["make-tiny-model", str(tmp_path / "tiny-colqwen"), "--recipe", "colqwen2.5"]) == 0
    folder = tmp_path / "tiny-colqwen" / "adapter"
    args = build_parser().parse_args(["serve", "--model", str(folder), "--device", "cpu"])
    extractor = Extractor(load_model(load_options(args)))
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in range(3):
        noise_image(112, 84, seed=seed).save(photos / f"photo{seed}.png")
    with BackgroundServer(extractor, server_config()) as running:
        search = [sys.executable, str(REPO / "examples" / "search" / "search.py"), "--server", running.address]
        query = ["--text", "a red bicycle", "--image", str(photos / "photo1.png"), "--pool-factor", "2"]
        command = [*search, "--images", str(photos), "--db", str(tmp_path / "index"), *query]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("indexed 3 images in ")
    # Each query lists the three images, best first (random weights: the order says nothing).
    assert [line for line in lines if not line.startswith("  ")] == [
        lines[0],
        "text 'a red bicycle'",
        f"image {photos / 'photo1.png'}",
    ]
    assert len(lines) == 1 + 2 * (1 + 3)


def test_serve_on_a_port_in_use_prints_only_its_own_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "qwen25vl_embed_server.cli", "serve", "--model", "unused", "--port", str(port)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    # gRPC's C core logs a failed bind on stderr itself: the port is checked before gRPC is asked.
    flags = "(--host, --port, --metrics-host, --metrics-port)"
    assert done.stderr == f"error: cannot listen on 127.0.0.1:{port}: the port is in use {flags}\n"


def test_a_host_that_is_not_here_is_refused_before_grpc_binds() -> None:
    with pytest.raises(ListenError, match=r"^cannot listen on 192\.0\.2\.1:50051: the host is not an address of"):
        check_bindable("192.0.2.1", 50051)  # TEST-NET-1: documentation only, never a machine's address
    with pytest.raises(ListenError, match=r"^cannot listen on 192\.0\.2\.1:0: the host is not an address of"):
        check_bindable("192.0.2.1", 0)  # any port: the host is checked all the same
    check_bindable("127.0.0.1", 0)


def test_log_level_warning_hides_the_libraries_progress_bars(tmp_path: Path, tiny_model_path: Path) -> None:
    image = tmp_path / "cat.png"
    noise_image(56, 56).save(image)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    cli = [sys.executable, "-m", "qwen25vl_embed_server.cli"]
    extract = ["extract", str(image), "--outdir", str(tmp_path / "out"), "--model", str(tiny_model_path)]
    done = subprocess.run(
        [*cli, "--log-level", "warning", *extract, "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "cat" / "manifest.json").is_file()
    # transformers' "Loading weights" bar, or any other tqdm bar (which redraws with carriage returns)
    assert "Loading weights" not in done.stderr, done.stderr[-3000:]
    assert "\r" not in done.stderr, done.stderr[-3000:]
    assert "it/s]" not in done.stderr, done.stderr[-3000:]
