"""Exposure policy: whether a bind address leaves this machine, and what to warn about then."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine ("localhost", 127.0.0.0/8, ::1)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve to anything
        return False


def exposure_warnings(host: str, *, tls: bool, auth: bool) -> list[str]:
    """Warnings for a server bound to ``host`` that other machines can reach without protection.

    Empty for loopback hosts, or when both TLS and bearer-token authentication are on.
    """
    if is_loopback(host):
        return []
    warnings = []
    if not tls:
        warnings.append(
            f"listening on {host} without TLS: images, embeddings"
            + (" and bearer tokens" if auth else "")
            + " cross the network in clear text (--tls-cert/--tls-key)"
        )
    if not auth:
        warnings.append(
            f"listening on {host} without authentication: anyone who can reach it can use it "
            "(--auth-token-file/--auth-token-env, or mutual TLS with --tls-client-ca)"
        )
    return warnings
