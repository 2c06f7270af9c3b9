"""The server's connection settings are in effect: an idle connection is closed after
``max_connection_idle_s`` (and a busy one is not), and the options carry the documented values."""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc

from qwen25vl_embed.v1 import embed_pb2 as pb
from qwen25vl_embed.v1 import embed_pb2_grpc as pb_grpc
from qwen25vl_embed_server.rpc.connections import ConnectionConfig
from qwen25vl_embed_server.rpc.harness import BackgroundServer


def _states(channel: grpc.Channel) -> tuple[list[grpc.ChannelConnectivity], threading.Event]:
    seen: list[grpc.ChannelConnectivity] = []
    left_ready = threading.Event()

    def record(state: grpc.ChannelConnectivity) -> None:
        seen.append(state)
        if grpc.ChannelConnectivity.READY in seen and state != grpc.ChannelConnectivity.READY:
            left_ready.set()

    channel.subscribe(record, try_to_connect=False)
    return seen, left_ready


def test_an_idle_connection_is_closed_after_max_connection_idle(
    tiny_server: Callable[..., BackgroundServer], server: BackgroundServer
) -> None:
    with (
        tiny_server(connections=ConnectionConfig(max_connection_idle_s=0.3)) as short,
        grpc.insecure_channel(short.address) as channel,
        grpc.insecure_channel(server.address) as default,
    ):
        _, closed = _states(channel)
        _, default_closed = _states(default)
        for each in (channel, default):
            pb_grpc.EmbeddingServiceStub(each).Info(pb.InfoRequest(), timeout=30)
        # GOAWAY after 0.3 s without calls: the channel goes IDLE (and reconnects on its next call).
        assert closed.wait(timeout=30), "the idle connection was not closed"
        assert not default_closed.is_set()  # the default server keeps it (300 s)
        assert pb_grpc.EmbeddingServiceStub(channel).Info(pb.InfoRequest(), timeout=30).model  # reconnected


def test_the_options_carry_the_documented_defaults() -> None:
    options = dict(ConnectionConfig().grpc_options())
    assert options == {
        "grpc.keepalive_time_ms": 60_000,
        "grpc.keepalive_timeout_ms": 20_000,
        "grpc.keepalive_permit_without_calls": 0,
        "grpc.max_connection_idle_ms": 300_000,
        "grpc.http2.min_recv_ping_interval_without_data_ms": 10_000,
        "grpc.http2.max_ping_strikes": 2,
    }
    assert dict(ConnectionConfig(max_connection_age_s=1800).grpc_options())["grpc.max_connection_age_ms"] == 1_800_000
