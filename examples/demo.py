"""End to end on the offline tiny model: start `qwen25vl-embed serve`, extract through the SDK, stop.

Run with `make demo`. Uses the real server process and the client SDK, as a user would.
"""

from __future__ import annotations

import sys
from pathlib import Path

from qwen25vl_embed import EmbeddingClient
from qwen25vl_embed_server.rpc.harness import ServerProcess

HERE = Path(__file__).parent
IMAGE = HERE / "images" / "landscape.png"
OUTDIR = Path("out") / "demo"
OUTPUTS = [
    "vision_tokens",
    "projected_tokens",
    "lm_last_hidden",
    "lm_image_tokens",
    "projected_pooled_mean",
    "lm_pooled_mean",
    "lm_last_token",
    "visual_token_lens",
]


class _Prefixed:
    """Echo the server's log lines, marked as such."""

    def write(self, line: str) -> None:
        sys.stderr.write(f"  [server] {line}")


def main() -> int:
    print("$ qwen25vl-embed serve --model tiny-random --port 0")
    server = ServerProcess(["--model", "tiny-random"], echo=_Prefixed()).start()
    try:
        with EmbeddingClient(server.address) as client:
            info = client.info()
            print(
                f"\nserver {server.address}: model {info.model} on {info.device} ({info.dtype}), "
                f"vision hidden {info.vision_hidden_size}, LM hidden {info.hidden_size}"
            )
            result = client.extract(IMAGE, prompt="Describe the image.", outputs=OUTPUTS)
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
        code = server.stop()
        print(f"server stopped (exit code {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
