"""serve's start-up checks: an out-of-range flag value exits 2 with one line naming the flag; a
port in use is an error, not a second server sharing its connections."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwen25vl_embed_server.cli import main
from qwen25vl_embed_server.core.model.extractor import Extractor
from qwen25vl_embed_server.rpc.harness import BackgroundServer
from qwen25vl_embed_server.rpc.server import ListenError, ServerConfig


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--stream-window", "0"),
        ("--preprocess-workers", "0"),
        ("--max-queue", "0"),
        ("--chunk-bytes", "0"),
        ("--batch-max-images", "0"),
        ("--batch-max-tokens", "-5"),
        ("--batch-max-wait-ms", "-1"),
        ("--max-piece-tokens", "-1"),
        ("--model-lanes", "0"),
        ("--grace", "-1"),
        ("--grace", "nan"),
        ("--port", "70000"),
        ("--metrics-port", "-1"),
        ("--max-images", "0"),
        ("--max-request-bytes", str(2**31)),
        ("--min-pixels", "0"),
    ],
)
def test_an_out_of_range_flag_exits_2_with_one_line_naming_it(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--model", "unused-never-loaded", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: {flag} must be ")
    floats = ("--grace", "--batch-max-wait-ms")
    assert err.rstrip().endswith(f"got {float(value)!r}" if flag in floats else f"got {int(value)}")


def test_min_pixels_above_max_pixels_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--min-pixels", "5000", "--max-pixels", "4000"]) == 2
    assert capsys.readouterr().err == "error: --min-pixels (5000) must not exceed --max-pixels (4000)\n"


def test_a_port_in_use_cannot_be_bound_twice(extractor: Extractor) -> None:
    with BackgroundServer(extractor, ServerConfig(port=0)) as first:
        port = int(first.address.rsplit(":", 1)[1])
        second = BackgroundServer(extractor, ServerConfig(port=port))
        try:
            with pytest.raises(ListenError, match=rf"^cannot listen on 127\.0\.0\.1:{port}: the port is in use"):
                second.start()
        finally:
            second.stop()


def test_serve_on_a_port_in_use_exits_2_with_one_line(extractor: Extractor, tiny_model_path: Path) -> None:
    # In a child process: serve runs its own event loop, which gRPC's poller must not outlive here.
    with BackgroundServer(extractor, ServerConfig(port=0)) as first:
        port = first.address.rsplit(":", 1)[1]
        command = [sys.executable, "-m", "qwen25vl_embed_server.cli", "--log-level", "warning", "serve"]
        done = subprocess.run(
            [*command, "--model", str(tiny_model_path), "--port", port],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.splitlines()[-1]
    assert last.startswith(f"error: cannot listen on 127.0.0.1:{port}: the port is in use")
    assert last.endswith("(--host, --port, --metrics-host, --metrics-port)")


def test_the_batching_flags_reach_the_batcher_config() -> None:
    from qwen25vl_embed_server.cli.app import build_parser
    from qwen25vl_embed_server.cli.flags import batching_of

    args = build_parser().parse_args(["serve", "--model-lanes", "1", "--batch-max-tokens", "100", "--max-queue", "7"])
    batching = batching_of(args)
    assert (batching.lanes, batching.max_tokens, batching.max_queue) == (1, 100, 7)
    assert batching.lanes_for("cpu") == 1
    default = batching_of(build_parser().parse_args(["serve"]))
    assert default.lanes is None
    assert (default.lanes_for("cpu"), default.lanes_for("cuda")) == (2, 1)


def test_the_bf16_arithmetic_flag_reaches_the_load_options_and_ray_settings() -> None:
    from qwen25vl_embed_server.cli.app import build_parser
    from qwen25vl_embed_server.cli.commands import load_options
    from qwen25vl_embed_server.ray.deployment import EmbedderSettings

    parser = build_parser()
    assert load_options(parser.parse_args(["serve", "--model", "m"])).bf16_arithmetic == "auto"
    for choice in ("native", "float32"):
        args = parser.parse_args(["serve", "--model", "m", "--bf16-arithmetic", choice])
        assert load_options(args).bf16_arithmetic == choice
        assert EmbedderSettings(bf16_arithmetic=choice).load_options().bf16_arithmetic == choice
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--model", "m", "--bf16-arithmetic", "fast"])


def test_the_allow_partial_weights_flag_reaches_the_load_options() -> None:
    from qwen25vl_embed_server.cli.app import build_parser
    from qwen25vl_embed_server.cli.commands import load_options

    parser = build_parser()
    for command in ("serve", "extract"):
        argv = [command, "--model", "m", *(["image.png"] if command == "extract" else [])]
        assert not load_options(parser.parse_args(argv)).allow_partial_weights
        assert load_options(parser.parse_args([*argv, "--allow-partial-weights"])).allow_partial_weights


def test_serve_refuses_a_partly_random_model_in_one_line(tiny_model_path: Path, tmp_path: Path) -> None:
    """A checkpoint missing a weight: exit 2 and one line naming it, before any request is served."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "tiny"
    shutil.copytree(tiny_model_path, model)
    weights = load_file(str(model / "model.safetensors"))
    del weights["model.norm.weight"]
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    command = [sys.executable, "-m", "qwen25vl_embed_server.cli", "--log-level", "warning", "serve"]
    done = subprocess.run(
        [*command, "--model", str(model), "--port", "0"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [
        f"error: cannot load model '{model}': checkpoint {model}: 1 missing (newly initialised): "
        "model.language_model.norm.weight; refusing to serve a partly random model "
        "(--allow-partial-weights loads it anyway)"
    ]
