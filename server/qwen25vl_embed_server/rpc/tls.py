"""TLS for the server: its certificate chain and key, and optionally a client CA for mutual TLS.

With ``client_ca`` set, every client must present a certificate signed by that CA (mutual TLS,
``require_client_auth``); the TLS handshake fails otherwise, and the client sees UNAVAILABLE.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TLSServerConfig:
    """PEM bytes: ``cert_chain`` (the server's certificate, then intermediates), ``private_key``,
    and ``client_ca`` (CA certificates that sign client certificates; None: no client certificates).
    ``repr`` never shows the key.
    """

    cert_chain: bytes
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = None

    def __post_init__(self) -> None:
        for name in ("cert_chain", "private_key", "client_ca"):
            value = getattr(self, name)
            if value is not None and b"-----BEGIN " not in value:
                raise ValueError(f"TLS {name} is not PEM data (no '-----BEGIN' line)")

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate."""
        return self.client_ca is not None

    @classmethod
    def from_files(
        cls,
        cert: str | os.PathLike[str],
        key: str | os.PathLike[str],
        client_ca: str | os.PathLike[str] | None = None,
    ) -> TLSServerConfig:
        """Read the PEM files.

        Raises:
            OSError: a file cannot be read.
            ValueError: a file is not PEM.
        """
        return cls(
            cert_chain=Path(cert).read_bytes(),
            private_key=Path(key).read_bytes(),
            client_ca=Path(client_ca).read_bytes() if client_ca is not None else None,
        )


def server_credentials(config: TLSServerConfig) -> grpc.ServerCredentials:
    """gRPC server credentials for ``config`` (mutual TLS when it has a client CA)."""
    return grpc.ssl_server_credentials(
        [(config.private_key, config.cert_chain)],
        root_certificates=config.client_ca,
        require_client_auth=config.mutual,
    )
