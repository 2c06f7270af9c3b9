"""Tensor transfer: token tensors delivered to numpy over gRPC loopback, beside a plain copy.

A minimal server streams one fixed float32 tensor through the project's codec (``codec.pack``, the
same chunking the service uses); the SDK's ``ResultBuilder`` rebuilds it. The figure is MB/s of
tensor bytes delivered to numpy, next to ``ndarray.copy()`` of the same bytes in memory.

    python bench/transfer.py [--mb 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np

from qwen25vl_embed import codec
from qwen25vl_embed.assembly import ResultBuilder
from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed_server.core.defaults import DEFAULT_CHUNK_BYTES

_METHOD = "/bench.Transfer/Stream"


@dataclass(frozen=True)
class TransferResult:
    megabytes: float
    grpc_mb_s: float
    copy_mb_s: float
    codec_mb_s: float

    @property
    def ratio(self) -> float:
        return self.grpc_mb_s / self.copy_mb_s


def _serve(array: np.ndarray, chunk_bytes: int, ready: threading.Event, port: list[int], stop: threading.Event) -> None:
    async def stream(_request: bytes, _context: object) -> AsyncIterator[pb.EmbeddingResponse]:
        yield pb.EmbeddingResponse(metadata=pb.ResponseMetadata(sequence_length=1))
        for parts in codec.pack({"lm_last_hidden": array}, chunk_bytes):
            yield pb.EmbeddingResponse(tensors=parts)

    async def main() -> None:
        server = grpc.aio.server()
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


def measure_transfer(megabytes: float = 64, repeats: int = 5, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> TransferResult:
    """Median MB/s over ``repeats`` of: gRPC loopback -> numpy, codec alone, and a memory copy."""
    rows = int(megabytes * 1e6 / (3584 * 4))
    array = np.random.default_rng(0).standard_normal((1, rows, 3584), dtype=np.float32)
    nbytes = array.nbytes
    ready, stop = threading.Event(), threading.Event()
    port: list[int] = []
    thread = threading.Thread(target=_serve, args=(array, chunk_bytes, ready, port, stop), daemon=True)
    thread.start()
    ready.wait()
    grpc_times, codec_times, copy_times = [], [], []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port[0]}") as channel:
            call = channel.unary_stream(
                _METHOD, request_serializer=lambda b: b, response_deserializer=pb.EmbeddingResponse.FromString
            )
            for _ in range(repeats + 1):  # the first run warms the channel up
                started = time.perf_counter()
                builder = ResultBuilder()
                for response in call(b""):
                    builder.add(response)
                received = builder.build()["lm_last_hidden"]
                grpc_times.append(time.perf_counter() - started)
            assert np.array_equal(received, array)
        for _ in range(repeats):
            started = time.perf_counter()
            builder = ResultBuilder()
            builder.add(pb.EmbeddingResponse(metadata=pb.ResponseMetadata(sequence_length=1)))
            for parts in codec.pack({"t": array}, chunk_bytes):
                builder.add(pb.EmbeddingResponse.FromString(pb.EmbeddingResponse(tensors=parts).SerializeToString()))
            builder.build()
            codec_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            array.copy()
            copy_times.append(time.perf_counter() - started)
    finally:
        stop.set()
        thread.join()
    mb = nbytes / 1e6
    return TransferResult(
        megabytes=mb,
        grpc_mb_s=mb / statistics.median(grpc_times[1:]),
        copy_mb_s=mb / statistics.median(copy_times),
        codec_mb_s=mb / statistics.median(codec_times),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=64, help="tensor size in MB (default 64)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    result = measure_transfer(args.mb, args.repeats)
    print(f"{result.megabytes:.0f} MB float32 tensor, 1 MiB messages:")
    print(f"  gRPC loopback -> numpy  {result.grpc_mb_s:8.0f} MB/s  ({result.ratio:.2f}x of a memory copy)")
    print(f"  codec only (no socket)  {result.codec_mb_s:8.0f} MB/s")
    print(f"  ndarray.copy()          {result.copy_mb_s:8.0f} MB/s")


if __name__ == "__main__":
    main()
