"""Overload soak: a real ``serve`` process (tiny model, loopback) at twice its capacity beside a hostile mix.

First the server's capacity is measured (closed loop: ``--callers`` callers of good requests for
``--calibrate`` seconds). Then, for ``--seconds``, good requests arrive open-loop at ``--load`` x that
rate (each with a ``--deadline``), while attackers send decompression bombs, images at the pixel
limit, ExtractBatch streams of heavy outputs that never read, and calls they cancel mid-way. It
reports the good requests' p50/p99 latency, how many were answered, refused (and how long a refusal
took, at the caller and in the server's request log, by request id), or ran out of time; every wrong
result; the server's refusals by reason (its metrics); its RSS over time against ``--memory-limit``;
and the machine's load average (other processes share its cores).

    python -m bench.overload.soak                   # 10 minutes at 2x capacity, --memory-limit 2G
    python -m bench.overload.soak --seconds 60      # a short run
"""

from __future__ import annotations

import io
import os
import re
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from bench.common import Benchmark, noise_image, png
from qwen25vl_embed import EmbeddingClient, EmbeddingError
from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed_server.core.fixtures.tiny_model import build_tiny_model
from qwen25vl_embed_server.rpc.harness import ServerProcess

BENCH = Benchmark(__spec__.name, __doc__)
SERVICE = "/qwen25vl_embed.v1.EmbeddingService/"
OUTPUTS = ["lm_last_token"]
HEAVY = ["vision_tokens", "lm_last_hidden"]
ATTACKERS = ("bomb", "oversized", "nonreader", "cancel")


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    return 0


def solid_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (120, 30, 200)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


class Mix:
    """Good requests (small and large images, with references) and the attackers, against one server."""

    def __init__(self, address: str, pid: int, until: float) -> None:
        self.address, self.pid, self.until = address, pid, until
        self.lock = threading.Lock()
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.latency: list[float] = []
        self.refusal_seconds: list[tuple[float, str]] = []  # at the caller, with the request id
        self.sent = 0
        self.wrong = 0
        rng = np.random.default_rng(0)
        sides = [448, 448, 448, 896, 1344]
        self.good = [png(noise_image(side, side, rng)) for side in sides]
        self.bomb, self.oversized = solid_png(8000), solid_png(7000)
        with EmbeddingClient(address, timeout=600) as client:
            self.reference = [client.extract(image, outputs=OUTPUTS)["lm_last_token"] for image in self.good]
        self.rss: list[tuple[float, float]] = []
        self.load: list[float] = []  # the 1-minute load average, each second

    def record(self, kind: str, status: str) -> None:
        with self.lock:
            self.outcomes[(kind, status)] += 1

    def good_request(self, client: EmbeddingClient, index: int, deadline: float) -> None:
        with self.lock:
            self.sent += 1
            request_id = f"good-{self.sent}"
        sent = time.monotonic()
        try:
            result = client.extract(self.good[index], outputs=OUTPUTS, timeout=deadline, request_id=request_id)
        except EmbeddingError as error:
            with self.lock:
                self.outcomes[("good", error.code.name)] += 1
                if error.code.name == "RESOURCE_EXHAUSTED":
                    self.refusal_seconds.append((time.monotonic() - sent, request_id))
            return
        ok = np.allclose(result["lm_last_token"], self.reference[index], rtol=1e-4, atol=1e-5)
        with self.lock:
            self.latency.append(time.monotonic() - sent)
            self.wrong += 0 if ok else 1
            self.outcomes[("good", "OK" if ok else "WRONG")] += 1

    def closed_loop(self, seed: int) -> None:
        with EmbeddingClient(self.address, timeout=600) as client:
            i = seed
            while time.monotonic() < self.until:
                self.good_request(client, i % len(self.good), 600)
                i += 1

    def open_loop(self, rate: float, deadline: float) -> None:
        """Good requests arriving every 1 / ``rate`` seconds, whatever the server does."""
        # No retries: what is measured is the server's answer to each arrival.
        with EmbeddingClient(self.address, timeout=600, retry=None) as client, ThreadPoolExecutor(128) as pool:
            i, start = 0, time.monotonic()
            while (now := time.monotonic()) < self.until:
                pool.submit(self.good_request, client, i % len(self.good), deadline)
                i += 1
                time.sleep(max(0.0, start + i / rate - now))

    def attacker(self, kind: str) -> None:
        with grpc.insecure_channel(self.address) as channel:
            while time.monotonic() < self.until:
                self.record(kind, self.attack(kind, channel))

    def attack(self, kind: str, channel: grpc.Channel) -> str:
        extract = channel.unary_stream(SERVICE + "Extract", pb.ImageRequest.SerializeToString, None)
        try:
            if kind in ("bomb", "oversized"):
                data = self.bomb if kind == "bomb" else self.oversized
                list(extract(pb.ImageRequest(images=[pb.Image(data=data)], outputs=OUTPUTS), timeout=60))
            elif kind == "nonreader":
                batch = channel.stream_stream(SERVICE + "ExtractBatch", None, None)
                unread = pb.ImageRequest(images=[pb.Image(data=self.good[3])], outputs=HEAVY).SerializeToString()
                call = batch(iter([unread] * 16), timeout=120)
                time.sleep(15)  # read nothing: the server ends the call after --send-timeout
                call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped
                return "abandoned unread"
            elif kind == "cancel":
                call = extract(pb.ImageRequest(images=[pb.Image(data=self.good[4])], outputs=HEAVY), timeout=60)
                time.sleep(0.5)
                call.cancel()  # type: ignore[no-untyped-call]
                list(call)
        except grpc.RpcError as error:
            return error.code().name
        return "OK"

    def sample_rss(self, started: float) -> None:
        while time.monotonic() < self.until:
            self.rss.append((time.monotonic() - started, status_kib(self.pid, "VmRSS") / 1024))
            self.load.append(os.getloadavg()[0])
            time.sleep(1.0)


class RequestLog:
    """The server's request log, kept for the good requests it refused: milliseconds by request id."""

    LINE = re.compile(r"id=(good-\d+) .*status=RESOURCE_EXHAUSTED ms=([0-9.]+)")

    def __init__(self) -> None:
        self.refused_ms: dict[str, float] = {}

    def write(self, text: str) -> None:
        found = self.LINE.search(text)
        if found:
            self.refused_ms[found.group(1)] = float(found.group(2))


def refusals(metrics_port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    found = re.findall(r'qwen25vl_embed_refusals_total\{reason="(\w+)"\} ([0-9.e+]+)', text)
    return {reason: float(value) for reason, value in found}


def run(targets: Sequence[threading.Thread]) -> None:
    for thread in targets:
        thread.start()
    for thread in targets:
        thread.join()


def main(argv: Sequence[str] | None = None) -> int:
    parser = BENCH.parser(argv)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--calibrate", type=float, default=30, help="seconds of the closed-loop capacity run")
    parser.add_argument("--callers", type=int, default=4, help="closed-loop callers measuring capacity")
    parser.add_argument("--load", type=float, default=2.0, help="offered load, times the measured capacity")
    parser.add_argument("--deadline", type=float, default=10.0, help="each good request's deadline, seconds")
    parser.add_argument("--memory-limit", default="2G")
    parser.add_argument("--attackers", default=",".join(ATTACKERS), help=f"comma-separated ({','.join(ATTACKERS)})")
    args = parser.parse_args(argv)
    kinds = [kind for kind in args.attackers.split(",") if kind]
    with tempfile.TemporaryDirectory() as folder:
        model = build_tiny_model(Path(folder) / "tiny")
        serve = ["--model", str(model), "--memory-limit", args.memory_limit, "--send-timeout", "5"]
        metrics_port = free_port()
        serve += ["--metrics-port", str(metrics_port)]
        log = RequestLog()
        with ServerProcess(serve, echo=log) as server:
            assert server.process is not None
            pid = server.process.pid
            mix = Mix(server.address, pid, 0.0)  # references first: every good image once
            mix.until = time.monotonic() + args.calibrate
            run([threading.Thread(target=mix.closed_loop, args=(seed,)) for seed in range(args.callers)])
            capacity = max(len(mix.latency), 1) / args.calibrate
            baseline = status_kib(pid, "VmRSS") / 1024
            mix.outcomes.clear()
            mix.latency.clear()
            started = time.monotonic()
            mix.until = started + args.seconds
            rate = args.load * capacity
            threads = [threading.Thread(target=mix.open_loop, args=(rate, args.deadline))]
            threads += [threading.Thread(target=mix.attacker, args=(kind,)) for kind in kinds]
            threads += [threading.Thread(target=mix.sample_rss, args=(started,))]
            run(threads)
            peak = status_kib(pid, "VmHWM") / 1024
            refused = refusals(metrics_port)
    ordered = sorted(mix.latency)
    p50 = float(np.percentile(ordered, 50) * 1000) if ordered else float("nan")
    p99 = float(np.percentile(ordered, 99) * 1000) if ordered else float("nan")
    slowest_refusal, slowest_id = max(mix.refusal_seconds, default=(0.0, ""))
    in_server = max(log.refused_ms.values(), default=0.0) / 1000
    load = max(mix.load, default=0.0), float(np.mean(mix.load)) if mix.load else 0.0
    print(f"capacity {capacity:.2f} good requests/s; offered {rate:.2f}/s for {args.seconds:.0f} s")
    print(f"good: {len(ordered)} answered, p50 {p50:.0f} ms, p99 {p99:.0f} ms; wrong {mix.wrong}")
    print(f"refusals (server, by reason): {refused}; slowest refusal {slowest_refusal:.2f} s at the caller")
    print(
        f"  in the server's request log: that one {log.refused_ms.get(slowest_id, float('nan')) / 1000:.2f} s, "
        f"the slowest {in_server:.2f} s"
    )
    print(f"load average (1 min): mean {load[1]:.1f}, peak {load[0]:.1f}, on {os.cpu_count()} CPUs")
    print(f"RSS: baseline {baseline:.0f} MiB, peak {peak:.0f} MiB, limit {args.memory_limit}")
    rows = [{"kind": kind, "outcome": status, "count": n} for (kind, status), n in sorted(mix.outcomes.items())]
    for row in rows:
        print(f"  {row['kind']:10s} {row['outcome']:24s} {row['count']}")
    summary = {
        "capacity good requests/s": capacity,
        "offered good requests/s": rate,
        "good answered": len(ordered),
        "good p50 ms": p50,
        "good p99 ms": p99,
        "wrong results": mix.wrong,
        "slowest refusal s": slowest_refusal,
        "slowest refusal in the server s": log.refused_ms.get(slowest_id, float("nan")) / 1000,
        "slowest refusal in the server, any s": in_server,
        "load average mean": load[1],
        "load average peak": load[0],
        "peak RSS MiB": peak,
        "baseline RSS MiB": baseline,
        **{f"refusals {reason}": count for reason, count in refused.items()},
    }
    details = {
        "rss_over_time": mix.rss,
        "load_over_time": mix.load,
        "settings": vars(args) | {"output": str(args.output)},
    }
    BENCH.write(args, rows, summary=summary, details=details)
    return 0 if mix.wrong == 0 else 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
