"""Soak: a bounded mixed attack on a real ``serve`` process (loopback, tiny model) beside good traffic.

For ``--seconds``, attacker threads send, over and over:

  bomb        a small PNG that decodes to --bomb-side x --bomb-side pixels (one image)
  bomb16      16 such images in one request (refused for its cost before decoding)
  bomb6       6 such images in one request, vision outputs only (admitted: under the cost cap; it
              runs in pieces, one image each, with small requests let through between them)
  nonreader   an ExtractBatch stream of 8 bombs whose caller never reads (ended by --send-timeout)
  malformed   bytes that are not an ImageRequest
  jpegcut     a JPEG cut mid-scan with an end marker added
  dupids      an ExtractBatch stream reusing one request id
  hostile     a 100,000-character output name with newlines

while --good-clients threads send small valid requests and time them. At the end it prints the
server's peak RSS (VmHWM from /proc), the outcome counts per kind and the good requests' latency,
and checks that every good request got its own correct result.

    python -m bench.service.soak                    # 180 s, defaults
    python -m bench.service.soak --seconds 60 --bomb-side 3584
    python -m bench.service.soak --seconds 60 --attackers bomb6 --max-piece-tokens 0   # large requests whole
"""

from __future__ import annotations

import io
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from bench.common import Benchmark, latency_ms, noise_image, png, run_threads
from qwen25vl_embed import EmbeddingClient, EmbeddingError
from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed_server.core.fixtures.tiny_model import build_tiny_model
from qwen25vl_embed_server.rpc.harness import ServerProcess

BENCH = Benchmark(__spec__.name, __doc__)
SERVICE = "/qwen25vl_embed.v1.EmbeddingService/"
KINDS = ["bomb", "bomb16", "bomb6", "nonreader", "nonreader", "malformed", "jpegcut", "dupids", "hostile"]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Soak:
    def __init__(self, address: str, seconds: float, bomb_side: int) -> None:
        self.address = address
        self.until = time.monotonic() + seconds
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.good_latency: list[float] = []
        self.wrong = 0
        self.lock = threading.Lock()
        self.bomb = png(Image.new("RGB", (bomb_side, bomb_side), (120, 30, 200)), optimize=True)
        jpeg = io.BytesIO()
        noise_image(256, 256, np.random.default_rng(1)).save(jpeg, "JPEG", quality=90)
        data = jpeg.getvalue()
        self.jpegcut = data[: len(data) // 2] + b"\xff\xd9"
        self.good = [png(noise_image(56 + 28 * (i % 3), 56, np.random.default_rng(i)), optimize=True) for i in range(6)]
        with EmbeddingClient(address, timeout=120) as client:
            self.reference = [client.extract(image, outputs=["lm_last_token"])["lm_last_token"] for image in self.good]

    def record(self, kind: str, status: str) -> None:
        with self.lock:
            self.outcomes[(kind, status)] += 1

    def good_client(self, seed: int) -> None:
        with EmbeddingClient(self.address, timeout=60) as client:
            i = seed
            while time.monotonic() < self.until:
                index = i % len(self.good)
                started = time.monotonic()
                try:
                    result = client.extract(self.good[index], outputs=["lm_last_token"], request_id=f"good-{i}")
                except EmbeddingError as error:
                    self.record("good", error.code.name)
                else:
                    with self.lock:
                        self.good_latency.append(time.monotonic() - started)
                    ok = result.request_id == f"good-{i}" and np.allclose(
                        result["lm_last_token"], self.reference[index], rtol=1e-4, atol=1e-5
                    )
                    self.wrong += 0 if ok else 1
                    self.record("good", "OK" if ok else "WRONG")
                i += 7

    def attacker(self, kind: str) -> None:
        with grpc.insecure_channel(self.address) as channel, EmbeddingClient(self.address, timeout=60) as client:
            while time.monotonic() < self.until:
                self.record(kind, self.attack(kind, channel, client))

    def attack(self, kind: str, channel: grpc.Channel, client: EmbeddingClient) -> str:
        raw_batch = channel.stream_stream(
            SERVICE + "ExtractBatch", request_serializer=None, response_deserializer=pb.EmbeddingResponse.FromString
        )
        try:
            if kind == "bomb":
                client.extract(self.bomb, outputs=["projected_pooled_mean"])
            elif kind == "bomb16":
                client.extract([self.bomb] * 16)
            elif kind == "bomb6":
                client.extract([self.bomb] * 6, outputs=["projected_pooled_mean"])
            elif kind == "jpegcut":
                client.extract(self.jpegcut)
            elif kind == "hostile":
                client.extract(self.good[0], outputs=["x\n" * 50_000])
            elif kind == "malformed":
                extract = channel.unary_stream(SERVICE + "Extract", request_serializer=None, response_deserializer=None)
                list(extract(b"\x0a\xe8\x07abc", timeout=30))
            elif kind == "dupids":
                request = pb.ImageRequest(images=[pb.Image(data=self.good[1])], request_id="same").SerializeToString()
                codes = {r.error.code for r in raw_batch(iter([request] * 3), timeout=60) if r.HasField("error")}
                return "refused-per-request" if codes == {grpc.StatusCode.INVALID_ARGUMENT.value[0]} else f"{codes}"
            elif kind == "nonreader":
                unread = pb.ImageRequest(images=[pb.Image(data=self.bomb)], outputs=["vision_tokens"])
                call = raw_batch(iter([unread.SerializeToString()] * 8), timeout=60)
                time.sleep(15)  # read nothing: the server ends the call after --send-timeout
                call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped
                return "abandoned unread"
        except grpc.RpcError as error:
            return error.code().name
        except EmbeddingError as error:
            return error.code.name
        return "OK"


def main(argv: Sequence[str] | None = None) -> int:
    parser = BENCH.parser(argv)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--good-clients", type=int, default=4)
    parser.add_argument("--bomb-side", type=int, default=1792, help="side of the decompression-bomb image")
    parser.add_argument("--send-timeout", type=float, default=5)
    parser.add_argument(
        "--attackers",
        default=",".join(KINDS),
        help=f"attacker kinds, comma-separated, repeats allowed ({','.join(KINDS)})",
    )
    parser.add_argument(
        "--max-piece-tokens", type=int, default=None, help="serve's --max-piece-tokens (0: large requests run whole)"
    )
    parser.add_argument("--server-log", type=Path, help="write the server's log here (a line per request)")
    args = parser.parse_args(argv)
    kinds = [kind for kind in args.attackers.split(",") if kind]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown attacker kind(s): {', '.join(unknown)}")
    with tempfile.TemporaryDirectory() as folder:
        model = build_tiny_model(Path(folder) / "tiny")
        serve_args = ["--model", str(model), "--send-timeout", str(args.send_timeout)]
        if args.max_piece_tokens is not None:
            serve_args += ["--max-piece-tokens", str(args.max_piece_tokens)]
        log = args.server_log.open("w") if args.server_log is not None else None
        with ServerProcess(serve_args, echo=log) as server:
            assert server.process is not None
            soak = Soak(server.address, args.seconds, args.bomb_side)
            callers = [partial(soak.attacker, kind) for kind in kinds]
            callers += [partial(soak.good_client, seed) for seed in range(args.good_clients)]
            elapsed = run_threads(callers)
            rss = peak_rss_mib(server.process.pid)
            with EmbeddingClient(server.address, timeout=60) as client:
                still_ok = client.extract(soak.good[0], outputs=["lm_last_token"]).num_images == 1
        if log is not None:
            log.close()
    pieces = "serve's" if args.max_piece_tokens is None else str(args.max_piece_tokens)
    print(
        f"soak: {elapsed:.0f} s, bomb {args.bomb_side}x{args.bomb_side}, send timeout {args.send_timeout:g} s, "
        f"max piece tokens {pieces}, attackers {','.join(kinds)}"
    )
    print(f"server peak RSS (VmHWM): {rss:.0f} MiB")
    rows = [{"kind": kind, "outcome": status, "count": n} for (kind, status), n in sorted(soak.outcomes.items())]
    for row in rows:
        print(f"  {row['kind']:10s} {row['outcome']:28s} {row['count']}")
    p50, p95, top = latency_ms(soak.good_latency)
    if soak.good_latency:
        print(
            f"good requests: {len(soak.good_latency)} ok, latency p50 {p50:.0f} ms, "
            f"p95 {p95:.0f} ms, max {top:.0f} ms; wrong {soak.wrong}"
        )
    print(f"server healthy afterwards: {still_ok}")
    figures = {
        "seconds": elapsed,
        "server peak RSS (VmHWM) MiB": rss,
        "good requests": len(soak.good_latency),
        "good latency p50 ms": p50,
        "good latency p95 ms": p95,
        "good latency max ms": top,
        "wrong results": soak.wrong,
        "server healthy afterwards": still_ok,
    }
    settings = {"bomb_side": args.bomb_side, "send_timeout": args.send_timeout, "max_piece_tokens": pieces}
    BENCH.write(args, rows, summary=figures, details={**settings, "attackers": kinds})
    return 0 if soak.wrong == 0 and still_ok else 1


if __name__ == "__main__":
    sys.exit(main())
