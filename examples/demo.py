"""End to end on the offline tiny model: start `qwen25vl-embed serve`, extract through the SDK, stop.

Run with `make demo`. Uses only the installed CLI and the client SDK, as a user would.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwen25vl_embed import EmbeddingClient

HERE = Path(__file__).parent
IMAGE = HERE / "images" / "landscape.png"
OUTDIR = Path("out") / "demo"


def _echo(log: IO[str]) -> None:
    for line in log:
        sys.stderr.write(f"  [server] {line}")


def start_server() -> tuple[subprocess.Popen[str], str]:
    """`qwen25vl-embed serve` on a free loopback port; returns once health says SERVING."""
    command = [sys.executable, "-m", "qwen25vl_embed_server.cli", "serve", "--model", "tiny-random", "--port", "0"]
    print("$", "qwen25vl-embed", *command[3:])
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert server.stderr is not None
    deadline = time.monotonic() + 300
    for line in server.stderr:
        sys.stderr.write(f"  [server] {line}")
        if match := re.search(r"listening on (\S+:\d+)", line):
            address = match.group(1)
            break
    else:
        raise SystemExit(f"the server exited with code {server.wait()} before listening")
    # Keep echoing (and draining) the server's log while the demo runs.
    threading.Thread(target=_echo, args=(server.stderr,), daemon=True).start()
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while health.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.SERVING:
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not become healthy")
            time.sleep(0.2)
    return server, address


def main() -> int:
    server, address = start_server()
    try:
        with EmbeddingClient(address) as client:
            info = client.info()
            print(
                f"\nserver {address}: model {info.model} on {info.device} ({info.dtype}), "
                f"vision hidden {info.vision_hidden_size}, LM hidden {info.hidden_size}"
            )
            outputs = [
                "vision_tokens",
                "projected_tokens",
                "lm_last_hidden",
                "lm_image_tokens",
                "projected_pooled_mean",
                "lm_pooled_mean",
                "lm_last_token",
                "visual_token_lens",
            ]
            result = client.extract(IMAGE, prompt="Describe the image.", outputs=outputs)
        print(
            f"\n{IMAGE.name}: {result.visual_token_lens[0]} image tokens, grid (t, h, w) = "
            f"{result.image_grid_thw[0].tolist()}, LM sequence length {result.sequence_length}"
        )
        for name in result.names:
            array = result[name]
            print(f"  {name:<22} {list(array.shape)!s:<14} {array.dtype}")
        saved = result.save(OUTDIR / IMAGE.stem)
        print(f"\nsaved to {saved}/ (*.npy + manifest.json)")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        print(f"server stopped (exit code {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
