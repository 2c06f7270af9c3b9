"""Starting the HTTP API: its flags are checked with serve's, a port it cannot take stops the
start-up with a clear error (the gRPC server stopped again), and it stops with the server."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from qwen25vl_embed_server.cli import app as cli
from qwen25vl_embed_server.http.config import HTTPConfig, HTTPListenError
from qwen25vl_embed_server.http.serving import HTTPServer
from qwen25vl_embed_server.rpc.server import create_server

from ..helpers import server_config


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--http-port", "70000"], "--http-port must be between 0 and 65535"),
        (["--http-port", "0", "--http-max-inputs", "0"], "--http-max-inputs must be at least 1"),
    ],
)
def test_bad_http_flags_are_refused_before_anything_starts(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", "--model", "tiny-random", "--port", "0", *argv]) == 2
    assert message in capsys.readouterr().err


def test_an_http_port_in_use_stops_the_start_and_the_grpc_server() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]

        async def scenario() -> None:
            config = server_config()
            with pytest.raises(HTTPListenError, match=rf"cannot listen on 127.0.0.1:{port} \(--http-port\)"):
                await create_server(config, [HTTPServer.beside(config, HTTPConfig(port=port))])

        asyncio.run(scenario())


def test_the_http_api_stops_with_the_server() -> None:
    async def scenario() -> None:
        config = server_config()
        http = HTTPServer.beside(config, HTTPConfig())
        running = await create_server(config, [http])
        url = http.url
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(f"{url}/health")).status_code == 503  # up, model not loaded
            await running.stop(0)
            with pytest.raises(httpx.ConnectError):
                await client.get(f"{url}/health")

    asyncio.run(scenario())
