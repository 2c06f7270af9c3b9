"""Unauthenticated calls with large bodies are refused before their bodies are read: a ``serve``
process with bearer tokens grows its peak RSS by well under the bodies' total while 6 such calls
of 40 MiB each are in flight (before the refusal was made on the metadata alone, each held its
whole body: about +500 MiB)."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc

from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed_server.rpc.harness import ServerProcess

MIB = 1 << 20
BODY = 40 * MIB
CALLS = 6
SERVICE = "/qwen25vl_embed.v1.EmbeddingService/"


def _peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_unauthenticated_large_bodies_are_refused_unread(tiny_model_path: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("the-only-token\n")
    tokens.chmod(0o600)
    arguments = ["--model", str(tiny_model_path), "--device", "cpu", "--dtype", "float32"]
    arguments += ["--auth-token-file", str(tokens)]
    body = pb.ImageRequest(images=[pb.Image(data=bytes(BODY))]).SerializeToString()
    assert BODY < len(body) < 64 * MIB  # under --max-request-bytes: gRPC itself would take it
    with ServerProcess(arguments, echo=None) as server:
        assert server.process is not None
        before = _peak_mib(server.process.pid)
        codes: list[grpc.StatusCode] = []

        def call(method: str) -> None:
            with grpc.insecure_channel(server.address) as channel:
                try:
                    if method == "Extract":  # a unary request, streamed responses
                        extract = channel.unary_stream(
                            SERVICE + method, request_serializer=None, response_deserializer=None
                        )
                        list(extract(body, timeout=60))
                    else:  # unary both ways
                        channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)(
                            body, timeout=60
                        )
                except grpc.RpcError as error:
                    codes.append(error.code())

        threads = [threading.Thread(target=call, args=(("Extract", "Info")[i % 2],)) for i in range(CALLS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        grown = _peak_mib(server.process.pid) - before
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * CALLS
    # Reading the bodies held all of them at once (6 x 40 MiB, about 500 MiB measured before the
    # fix). A refused call leaves only what gRPC received before the refusal reached the client,
    # which varies with timing: 9-44 MiB in all from run to run here, so the bound is half the bodies.
    assert grown < CALLS * BODY / 2 / MIB, f"the server's peak RSS grew {grown:.0f} MiB"
