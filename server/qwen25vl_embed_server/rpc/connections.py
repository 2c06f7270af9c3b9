"""How long the server keeps connections: keepalive pings, idle and age limits (gRPC options).

- ``keepalive_time_s`` / ``keepalive_timeout_s``: on a connection with calls open, the server
  pings after this long without traffic and closes the connection when no answer comes in the
  timeout. A client that vanished (power loss, a dropped NAT mapping: no FIN ever comes) thus
  frees its calls, and the budgets they hold, within about a minute and a half instead of the
  kernel's TCP timeouts (hours). gRPC's own default is a ping every 2 hours.
- ``max_connection_idle_s``: a connection without calls for this long is closed (GOAWAY); the
  client's channel reconnects on its next call, transparently. gRPC's default: never.
- ``max_connection_age_s`` (None: never): a connection older than this is sent GOAWAY; its open
  calls finish (no grace limit), new ones go to a new connection, so long-lived clients spread
  again over servers behind a TCP load balancer.
- Client pings: accepted down to one every ``min_client_ping_interval_s`` with no data in between
  (gRPC's server default, 5 minutes, answers a client that keeps alive every 30 s with GOAWAY
  ``too_many_pings`` after two strikes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ConnectionConfig:
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    max_connection_idle_s: float = 300.0
    max_connection_age_s: float | None = None
    min_client_ping_interval_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("keepalive_time_s", "keepalive_timeout_s", "max_connection_idle_s", "min_client_ping_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.max_connection_age_s is not None and not self.max_connection_age_s > 0:
            raise ValueError(f"max_connection_age_s must be positive, got {self.max_connection_age_s!r}")

    def grpc_options(self) -> list[tuple[str, Any]]:
        """The server options that put these in effect."""
        options: list[tuple[str, Any]] = [
            ("grpc.keepalive_time_ms", _ms(self.keepalive_time_s)),
            ("grpc.keepalive_timeout_ms", _ms(self.keepalive_timeout_s)),
            ("grpc.keepalive_permit_without_calls", 0),  # idle connections: max_connection_idle
            ("grpc.max_connection_idle_ms", _ms(self.max_connection_idle_s)),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", _ms(self.min_client_ping_interval_s)),
            ("grpc.http2.max_ping_strikes", 2),
        ]
        if self.max_connection_age_s is not None:
            options.append(("grpc.max_connection_age_ms", _ms(self.max_connection_age_s)))
        return options


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
