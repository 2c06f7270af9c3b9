"""HTTP/JSON against gRPC: the same requests to one server process, latency at concurrency 1 and
images/s at concurrency 16, in alternating rounds.

    python -m bench.http.vs_grpc                      # bench checkpoint, fp32, 448x448 noise PNGs
    python -m bench.http.vs_grpc --rounds 3 --images 32

One ``qwen25vl-embed serve --http-port 0`` child process serves both edges over one pipeline.
Each request asks for one L2-normalised ``lm_last_token`` vector: over gRPC with the SDK
(``extract(..., outputs=["lm_last_token"], normalize=True)``), over HTTP as vLLM's chat-style
``messages`` to ``POST /v1/embeddings`` (a data URL, JSON floats back). Workloads: a short text
(the edges' own cost stands out) and a 448x448 image, one caller, one request after another
(median and p95 ms); then 16 callers sending the images (images/s). The sides alternate round by
round; the vectors of both edges are compared (their largest relative difference is reported).
"""

from __future__ import annotations

import base64
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import numpy as np

from bench.common import Benchmark, alternating, checkpoint, concurrently, latency_ms, noise_png, relative_difference
from qwen25vl_embed import EmbeddingClient
from qwen25vl_embed_server.rpc.harness import ServerProcess

BENCH = Benchmark(__spec__.name, __doc__)
OUTPUT = "lm_last_token"
TEXT = "a short query about a photo"
SIDES = ("grpc", "http")


class _Log:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> None:
        self.text += text


class Edges:
    """One request, either edge: each returns the vector (float32)."""

    def __init__(self, grpc_address: str, http_url: str) -> None:
        self.sdk = EmbeddingClient(grpc_address)
        self.http_url = http_url
        self._local = threading.local()

    def _http(self) -> httpx.Client:
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:  # one keep-alive connection per calling thread, as a pool would give
            client = self._local.client = httpx.Client(base_url=self.http_url, timeout=600)
        return client

    def grpc(self, image: bytes | None) -> np.ndarray:
        if image is None:
            result = self.sdk.extract(None, prompt=TEXT, prompt_format="raw", outputs=[OUTPUT], normalize=True)
        else:
            result = self.sdk.extract(image, outputs=[OUTPUT], normalize=True)
        return np.asarray(result[OUTPUT][0])

    def http(self, image: bytes | None) -> np.ndarray:
        if image is None:
            body: dict[str, Any] = {"input": TEXT, "encoding_format": "float"}
        else:
            url = f"data:image/png;base64,{base64.b64encode(image).decode()}"
            body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
        reply = self._http().post("/v1/embeddings", json=body)
        reply.raise_for_status()
        return np.asarray(reply.json()["data"][0]["embedding"], np.float32)


def main(argv: Sequence[str] | None = None) -> None:
    parser = BENCH.parser(argv)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8, help="requests per side per round at concurrency 1")
    parser.add_argument("--images", type=int, default=32, help="images per side per round at concurrency 16")
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--size", type=int, default=448)
    args = parser.parse_args(argv)
    model = str(checkpoint(args.dtype))
    load_before = os.getloadavg()[0]
    log = _Log()
    arguments = ["--model", model, "--dtype", args.dtype, "--http-port", "0"]
    with ServerProcess(arguments, echo=log) as server:
        match = re.search(r"HTTP API at (http://\S+)", log.text)
        assert match is not None, log.text
        edges = Edges(server.address, match.group(1))
        side = args.size
        images = [noise_png(side, side, seed) for seed in range(max(args.images, args.requests))]
        for name in SIDES:  # warm-up: both edges, text and image
            getattr(edges, name)(None)
            getattr(edges, name)(images[0])
        vectors: dict[str, list[np.ndarray]] = {name: [] for name in SIDES}

        def one_by_one(name: str, image_of: Callable[[int], bytes | None]) -> Callable[[], list[float]]:
            def run() -> list[float]:
                seconds = []
                for index in range(args.requests):
                    started = time.perf_counter()
                    vector = getattr(edges, name)(image_of(index))
                    seconds.append(time.perf_counter() - started)
                    vectors[name].append(vector)
                return seconds

            return run

        def in_parallel(name: str) -> Callable[[], float]:
            def run() -> float:
                call = getattr(edges, name)
                count: int = args.images
                return count / concurrently(count, args.callers, lambda index: call(images[index]))

            return run

        rows = []
        for label, image_of in (("text", lambda index: None), (f"image {side}x{side}", lambda index: images[index])):
            timed = alternating({name: one_by_one(name, image_of) for name in SIDES}, args.rounds)
            row: dict[str, Any] = {"request": label, "callers": 1}
            for name in SIDES:
                median, p95, _ = latency_ms([s for round_ in timed[name] for s in round_])
                row[f"{name} ms (median)"], row[f"{name} ms (p95)"] = median, p95
            row["http / grpc"] = row["http ms (median)"] / row["grpc ms (median)"]
            rows.append(row)
        rates = alternating({name: in_parallel(name) for name in SIDES}, args.rounds)
        rate = {name: float(np.median(rates[name])) for name in SIDES}
        rows.append(
            {
                "request": f"image {side}x{side}",
                "callers": args.callers,
                "grpc images/s": rate["grpc"],
                "http images/s": rate["http"],
                "http / grpc": rate["http"] / rate["grpc"],
            }
        )
        difference = max(
            relative_difference(got, want) for got, want in zip(vectors["http"], vectors["grpc"], strict=True)
        )
    print(f"{args.dtype}, {model}")
    for row in rows:
        print(
            "  ".join(
                f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}" for key, value in row.items()
            )
        )
    print(f"largest relative difference of the HTTP vectors from gRPC's: {difference:.2e}")
    BENCH.write(
        args,
        rows,
        summary={
            "largest relative difference, HTTP vs gRPC vectors": difference,
            # Other work on the machine slows both sides alike (alternating rounds), but not evenly.
            "load average (1 min) before / after": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        },
        details={"dtype": args.dtype, "rounds": args.rounds, "rates": rates},
    )


if __name__ == "__main__":
    main()
