"""Tensor transfer: token tensors delivered to numpy over gRPC loopback, the server's two ways.

A minimal server streams one fixed float32 tensor through the service's own response path
(``response_messages``, the same chunking and serializer) in one of two ways, alternating round by
round in one run:

  messages   protobuf messages built the usual way (Tensor, then EmbeddingResponse, serialized)
  encoded    the server's path: the same bytes written with one copy of the tensor data
             (``rpc/encoded_responses.py``)

The SDK's ``ResultBuilder`` rebuilds the tensor. It prints MB/s of tensor bytes delivered to numpy
(median over rounds), the server's side alone (building and serializing the messages) and
``ndarray.copy()`` of the same bytes.

    python -m bench.service.transfer [--mb 64] [--rounds 5]
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from bench.common import Benchmark, alternating
from qwen25vl_embed.assembly import ResultBuilder
from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed_server.core.defaults import DEFAULT_CHUNK_BYTES
from qwen25vl_embed_server.core.model.finishing import Extraction
from qwen25vl_embed_server.rpc.encoded_responses import PassEncodedResponses, passing_encoded
from qwen25vl_embed_server.rpc.messages import response_messages

BENCH = Benchmark(__spec__.name, __doc__)
_METHOD = "/bench.Transfer/Stream"
PATHS = ("messages", "encoded")


@dataclass(frozen=True)
class TransferResult:
    """MB/s by path (:data:`PATHS`): delivered over gRPC into numpy, and built by the server alone."""

    megabytes: float
    grpc_mb_s: dict[str, float]
    server_mb_s: dict[str, float]
    copy_mb_s: float

    def speedup(self, figures: dict[str, float]) -> float:
        return figures["encoded"] / figures["messages"]


def _extraction(array: np.ndarray) -> Extraction:
    none = np.zeros(0, np.int64)
    return Extraction({"lm_last_hidden": array}, none, none.reshape(0, 3), none, array.shape[1])


def _serve(
    result: Extraction, chunk_bytes: int, ready: threading.Event, port: list[int], stop: threading.Event
) -> None:
    async def stream(request: bytes, _context: object) -> AsyncIterator[pb.EmbeddingResponse | bytes]:
        for message in response_messages("", result, chunk_bytes, encoded=request == b"encoded"):
            yield message

    async def main() -> None:
        server = grpc.aio.server(interceptors=[PassEncodedResponses()])
        handler = grpc.method_handlers_generic_handler(
            "bench.Transfer",
            {
                "Stream": grpc.unary_stream_rpc_method_handler(
                    stream,
                    request_deserializer=lambda b: b,
                    response_serializer=pb.EmbeddingResponse.SerializeToString,
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))
        port.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await server.stop(None)

    asyncio.run(main())


def _seconds(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def measure_transfer(megabytes: float = 64, rounds: int = 5, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> TransferResult:
    """Median MB/s over ``rounds`` alternating rounds of both paths, and of a memory copy."""
    rows = int(megabytes * 1e6 / (3584 * 4))
    array = np.random.default_rng(0).standard_normal((1, rows, 3584), dtype=np.float32)
    result = _extraction(array)
    ready, stop = threading.Event(), threading.Event()
    port: list[int] = []
    thread = threading.Thread(target=_serve, args=(result, chunk_bytes, ready, port, stop), daemon=True)
    thread.start()
    ready.wait()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port[0]}") as channel:
            call = channel.unary_stream(
                _METHOD, request_serializer=lambda b: b, response_deserializer=pb.EmbeddingResponse.FromString
            )

            def receive(path: str) -> None:
                builder = ResultBuilder()
                for response in call(path.encode()):
                    builder.add(response)
                assert np.array_equal(builder.build()["lm_last_hidden"], array)

            def build(path: str) -> None:
                serialize = passing_encoded(pb.EmbeddingResponse.SerializeToString)  # as the server does
                for message in response_messages("", result, chunk_bytes, encoded=path == "encoded"):
                    serialize(message)

            def both(path: str) -> Callable[[], tuple[float, float]]:
                """One round of ``path``: seconds delivered into numpy, seconds built by the server alone."""
                return lambda: (_seconds(lambda: receive(path)), _seconds(lambda: build(path)))

            for path in PATHS:  # warm the channel and both paths up
                receive(path)
            sides = {path: both(path) for path in PATHS}
            sides["copy"] = lambda: (_seconds(array.copy), 0.0)
            times = alternating(sides, rounds)
    finally:
        stop.set()
        thread.join()
    mb = array.nbytes / 1e6

    def rate(name: str, side: int) -> float:
        return mb / statistics.median(pair[side] for pair in times[name])

    return TransferResult(
        megabytes=mb,
        grpc_mb_s={path: rate(path, 0) for path in PATHS},
        server_mb_s={path: rate(path, 1) for path in PATHS},
        copy_mb_s=rate("copy", 0),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = BENCH.parser(argv)
    parser.add_argument("--mb", type=float, default=64, help="tensor size in MB (default 64)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    result = measure_transfer(args.mb, args.rounds)
    print(f"{result.megabytes:.0f} MB float32 tensor, 1 MiB messages, {args.rounds} alternating rounds (MB/s):")
    print(f"{'':34} {'messages':>9} {'encoded':>9}")
    figures = {"gRPC loopback -> numpy": result.grpc_mb_s, "the server's side alone": result.server_mb_s}
    rows: list[dict[str, object]] = []
    for label, mb_s in figures.items():
        print(f"  {label:32} {mb_s['messages']:9.0f} {mb_s['encoded']:9.0f}  x{result.speedup(mb_s):.2f}")
        rows.append({"MB/s": label, **mb_s, "encoded / messages": result.speedup(mb_s)})
    print(f"  {'ndarray.copy()':32} {result.copy_mb_s:9.0f}")
    summary = {"ndarray.copy() of the same bytes, MB/s": result.copy_mb_s}
    BENCH.write(args, rows, summary=summary, details={"megabytes": result.megabytes, "rounds": args.rounds})


if __name__ == "__main__":
    main()
