"""TLS, mutual TLS and bearer tokens, through real servers and the real SDK; exposure warnings;
the security flags of the CLI. Certificates are made here, with a throwaway CA."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from qwen25vl_embed import EmbeddingClient, EmbeddingError
from qwen25vl_embed.channels import TLSConfig, create_channel
from qwen25vl_embed_server.cli import app as cli
from qwen25vl_embed_server.cli.commands import server_config
from qwen25vl_embed_server.rpc.auth import AuthConfig, load_tokens
from qwen25vl_embed_server.rpc.exposure import exposure_warnings, is_loopback
from qwen25vl_embed_server.rpc.harness import BackgroundServer
from qwen25vl_embed_server.rpc.server import ServerConfig, create_server
from qwen25vl_embed_server.rpc.tls import TLSServerConfig

from ..helpers import noise_image, png_bytes

TOKENS = ("token-alpha-1234", "token-beta-5678")
TIMEOUT = 10.0


# -- a throwaway PKI -------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class Authority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(cls, common_name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def issue(self, common_name: str, *, server: bool) -> tuple[bytes, bytes]:
        """(certificate PEM, private key PEM) for a server (SAN localhost, 127.0.0.1) or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


@dataclass(frozen=True)
class PKI:
    ca: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes
    other_ca: bytes  # a CA that signed nothing of ours
    stranger_cert: bytes  # a client certificate from the other CA
    stranger_key: bytes


@pytest.fixture(scope="module")
def pki() -> PKI:
    ca, other = Authority.create("test CA"), Authority.create("other CA")
    server_cert, server_key = ca.issue("embedding server", server=True)
    client_cert, client_key = ca.issue("embedding client", server=False)
    stranger_cert, stranger_key = other.issue("stranger", server=False)
    return PKI(ca.pem, server_cert, server_key, client_cert, client_key, other.pem, stranger_cert, stranger_key)


# -- servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_server(tiny_server: Callable[..., BackgroundServer]) -> Iterator[BackgroundServer]:
    """Plaintext, bearer tokens."""
    with tiny_server(auth=AuthConfig(TOKENS)) as running:
        yield running


@pytest.fixture(scope="module")
def tls_server(tiny_server: Callable[..., BackgroundServer], pki: PKI) -> Iterator[BackgroundServer]:
    """TLS and bearer tokens."""
    tls = TLSServerConfig(cert_chain=pki.server_cert, private_key=pki.server_key)
    with tiny_server(tls=tls, auth=AuthConfig(TOKENS)) as running:
        yield running


@pytest.fixture(scope="module")
def mtls_server(tiny_server: Callable[..., BackgroundServer], pki: PKI) -> Iterator[BackgroundServer]:
    """Mutual TLS, no tokens."""
    tls = TLSServerConfig(cert_chain=pki.server_cert, private_key=pki.server_key, client_ca=pki.ca)
    with tiny_server(tls=tls) as running:
        yield running


def code_of(client: EmbeddingClient) -> grpc.StatusCode:
    try:
        client.info(timeout=TIMEOUT)
    except EmbeddingError as err:
        return err.code
    return grpc.StatusCode.OK


# -- bearer tokens ---------------------------------------------------------------------------


def test_right_tokens_are_accepted(auth_server: BackgroundServer) -> None:
    for token in TOKENS:
        with EmbeddingClient(auth_server.address, token=token) as client:
            assert client.info(timeout=TIMEOUT).hidden_size > 0
            result = client.extract(png_bytes(noise_image(32, 32)), timeout=TIMEOUT)
            assert result["lm_pooled_mean"].shape[0] == 1


def test_missing_token_is_unauthenticated(auth_server: BackgroundServer) -> None:
    with EmbeddingClient(auth_server.address) as client:
        with pytest.raises(EmbeddingError) as caught:
            client.info(timeout=TIMEOUT)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "missing credentials" in caught.value.details
        assert "authorization: Bearer <token>" in caught.value.details
        # The streaming RPC is refused the same way, before the request is looked at.
        with pytest.raises(EmbeddingError) as caught:
            client.extract(png_bytes(noise_image(32, 32)), timeout=TIMEOUT)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("token", ["wrong-token", TOKENS[0] + "x", TOKENS[0][:-1]])
def test_wrong_token_is_unauthenticated(auth_server: BackgroundServer, token: str) -> None:
    with EmbeddingClient(auth_server.address, token=token) as client, pytest.raises(EmbeddingError) as caught:
        client.info(timeout=TIMEOUT)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details == "invalid bearer token"


@pytest.mark.parametrize("value", [f"Basic {TOKENS[0]}", TOKENS[0], "Bearer "])
def test_malformed_authorization_is_unauthenticated(auth_server: BackgroundServer, value: str) -> None:
    from qwen25vl_embed.v1 import embed_pb2 as pb
    from qwen25vl_embed.v1 import embed_pb2_grpc as pb_grpc

    with grpc.insecure_channel(auth_server.address) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.EmbeddingServiceStub(channel).Info(
            pb.InfoRequest(), metadata=(("authorization", value),), timeout=TIMEOUT
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expected 'Bearer <token>'" in (caught.value.details() or "")


def test_health_is_open_without_a_token(auth_server: BackgroundServer) -> None:
    with grpc.insecure_channel(auth_server.address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_needs_a_token(auth_server: BackgroundServer) -> None:
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with grpc.insecure_channel(auth_server.address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request])))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # With the token (added by the SDK's interceptor to every kind of call, streams included).
    with create_channel(auth_server.address, token=TOKENS[1]) as channel:
        responses = list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request])))
    names = {service.name for service in responses[0].list_services_response.service}
    assert "qwen25vl_embed.v1.EmbeddingService" in names


def test_tokens_never_appear_in_reprs() -> None:
    auth = AuthConfig(TOKENS)
    for text in (repr(auth), repr(ServerConfig(auth=auth))):
        assert all(token not in text for token in TOKENS)


def test_load_tokens_from_a_file_and_an_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens"
    path.write_text("# clients of team A\nfirst-token\n\n  second-token  \n")
    path.chmod(0o600)
    monkeypatch.setenv("EMBED_TOKENS", "third-token, fourth-token")
    with caplog.at_level(logging.WARNING):
        assert load_tokens(path, "EMBED_TOKENS") == ["first-token", "second-token", "third-token", "fourth-token"]
    assert not caplog.records
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        load_tokens(path)
    assert "readable by other users" in caplog.text
    monkeypatch.setenv("EMPTY", " ")
    with pytest.raises(ValueError, match="EMPTY is unset or empty"):
        load_tokens(token_env="EMPTY")
    (tmp_path / "blank").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no token found"):
        load_tokens(tmp_path / "blank")
    with pytest.raises(ValueError, match="give a token file"):
        load_tokens()


@pytest.mark.parametrize("token", ["", "has space", "line\nbreak", "caf\u00e9"])
def test_unusable_tokens_are_refused_on_both_sides(token: str) -> None:
    with pytest.raises(ValueError, match="printable ASCII"):
        AuthConfig((token,))
    with pytest.raises(ValueError, match="printable ASCII"):
        create_channel("127.0.0.1:1", token=token)


# -- TLS -------------------------------------------------------------------------------------


def test_tls_with_the_ca_works(tls_server: BackgroundServer, pki: PKI, tmp_path: Path) -> None:
    with EmbeddingClient(tls_server.address, tls=TLSConfig(ca_cert=pki.ca), token=TOKENS[0]) as client:
        assert code_of(client) == grpc.StatusCode.OK
        assert client.extract(png_bytes(noise_image(32, 32)), timeout=TIMEOUT)["lm_pooled_mean"].shape[0] == 1
    # PEM given as a file path works the same.
    (tmp_path / "ca.pem").write_bytes(pki.ca)
    with EmbeddingClient(tls_server.address, tls=TLSConfig(ca_cert=tmp_path / "ca.pem"), token=TOKENS[0]) as client:
        assert code_of(client) == grpc.StatusCode.OK


def test_tls_still_needs_the_token(tls_server: BackgroundServer, pki: PKI) -> None:
    with EmbeddingClient(tls_server.address, tls=TLSConfig(ca_cert=pki.ca)) as client:
        assert code_of(client) == grpc.StatusCode.UNAUTHENTICATED


def test_tls_without_the_ca_fails(tls_server: BackgroundServer, pki: PKI) -> None:
    # System roots, or another CA: the server's certificate is not trusted.
    for tls in (TLSConfig(), TLSConfig(ca_cert=pki.other_ca)):
        with EmbeddingClient(tls_server.address, tls=tls, token=TOKENS[0]) as client:
            assert code_of(client) == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_cannot_talk_to_a_tls_server(tls_server: BackgroundServer) -> None:
    with EmbeddingClient(tls_server.address, token=TOKENS[0]) as client:
        assert code_of(client) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_accepts_only_certificates_of_its_ca(mtls_server: BackgroundServer, pki: PKI) -> None:
    good = TLSConfig(ca_cert=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key)
    with EmbeddingClient(mtls_server.address, tls=good) as client:
        assert code_of(client) == grpc.StatusCode.OK
    without_cert = TLSConfig(ca_cert=pki.ca)
    stranger = TLSConfig(ca_cert=pki.ca, client_cert=pki.stranger_cert, client_key=pki.stranger_key)
    for tls in (without_cert, stranger):
        with EmbeddingClient(mtls_server.address, tls=tls) as client:
            assert code_of(client) == grpc.StatusCode.UNAVAILABLE


def test_tls_config_validation(pki: PKI) -> None:
    with pytest.raises(ValueError, match="go together"):
        TLSConfig(ca_cert=pki.ca, client_cert=pki.client_cert)
    with pytest.raises(ValueError, match="not PEM"):
        TLSServerConfig(cert_chain=b"garbage", private_key=pki.server_key)
    assert "PRIVATE KEY" not in repr(TLSServerConfig(cert_chain=pki.server_cert, private_key=pki.server_key))
    assert "PRIVATE KEY" not in repr(TLSConfig(client_cert=pki.client_cert, client_key=pki.client_key))
    with pytest.raises(ValueError, match="not with channel="):
        EmbeddingClient("127.0.0.1:1", channel=grpc.insecure_channel("127.0.0.1:1"), token="t")


# -- exposure warnings -----------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)
    assert exposure_warnings(host, tls=False, auth=False) == []


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "embed.example.com"])
def test_exposed_hosts_warn_for_what_is_missing(host: str) -> None:
    assert not is_loopback(host)
    assert len(exposure_warnings(host, tls=False, auth=False)) == 2
    (no_tls,) = exposure_warnings(host, tls=False, auth=True)
    assert "without TLS" in no_tls
    assert "bearer tokens" in no_tls
    (no_auth,) = exposure_warnings(host, tls=True, auth=False)
    assert "without authentication" in no_auth
    assert exposure_warnings(host, tls=True, auth=True) == []


def _start_and_stop(config: ServerConfig) -> None:
    async def run() -> None:
        running = await create_server(config)
        await running.stop(None)

    asyncio.run(run())


def test_binding_all_interfaces_unprotected_logs_warnings(caplog: pytest.LogCaptureFixture, pki: PKI) -> None:
    with caplog.at_level(logging.WARNING, logger="qwen25vl_embed_server.rpc.server"):
        _start_and_stop(ServerConfig(host="0.0.0.0", port=0))
    messages = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("0.0.0.0 without TLS" in message for message in messages)
    assert any("0.0.0.0 without authentication" in message for message in messages)
    caplog.clear()
    # Loopback: nothing; all interfaces with mutual TLS (authenticates clients): nothing either.
    mtls = TLSServerConfig(cert_chain=pki.server_cert, private_key=pki.server_key, client_ca=pki.ca)
    with caplog.at_level(logging.WARNING, logger="qwen25vl_embed_server.rpc.server"):
        _start_and_stop(ServerConfig(host="127.0.0.1", port=0))
        _start_and_stop(ServerConfig(host="0.0.0.0", port=0, tls=mtls))
    # Only the server's own records: grpc.aio's poller can log "Event loop is closed" on the asyncio
    # logger when a test process runs several event loops one after another (not a server warning).
    ours = [r for r in caplog.records if r.name.startswith("qwen25vl_embed_server") and r.levelno >= logging.WARNING]
    assert not ours


# -- command line ----------------------------------------------------------------------------


def _write_pki(pki: PKI, folder: Path) -> dict[str, Path]:
    paths = {}
    for name in ("ca", "server_cert", "server_key", "client_cert", "client_key"):
        paths[name] = folder / f"{name}.pem"
        paths[name].write_bytes(getattr(pki, name))
        paths[name].chmod(0o600)
    return paths


def test_serve_security_flags(pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _write_pki(pki, tmp_path)
    monkeypatch.setenv("EMBED_TOKEN", TOKENS[0])
    args = cli.build_parser().parse_args(
        [
            "serve",
            f"--tls-cert={paths['server_cert']}",
            f"--tls-key={paths['server_key']}",
            f"--tls-client-ca={paths['ca']}",
            "--auth-token-env=EMBED_TOKEN",
        ]
    )
    config = server_config(args)
    assert config.tls == TLSServerConfig(pki.server_cert, pki.server_key, pki.ca)
    assert config.auth == AuthConfig((TOKENS[0],))
    plain = server_config(cli.build_parser().parse_args(["serve"]))
    assert plain.tls is None
    assert plain.auth is None


def test_tokens_cannot_be_given_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["serve", "--auth-token", "secret"], ["info", "--server", "x:1", "--token", "secret"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(argv)
    capsys.readouterr()


def test_serve_refuses_half_a_tls_configuration(pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _write_pki(pki, tmp_path)
    assert cli.main(["serve", f"--tls-cert={paths['server_cert']}"]) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
    assert cli.main(["serve", f"--tls-client-ca={paths['ca']}"]) == 2
    assert "--tls-client-ca needs" in capsys.readouterr().err


def test_info_over_tls_with_a_token_from_a_file(
    tls_server: BackgroundServer, pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = _write_pki(pki, tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text(TOKENS[1] + "\n")
    os.chmod(token_file, 0o600)
    base = ["info", "--server", tls_server.address, f"--tls-ca={paths['ca']}"]
    assert cli.main([*base, f"--token-file={token_file}"]) == 0
    assert json.loads(capsys.readouterr().out)["hidden_size"] > 0
    assert cli.main(base) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_extract_security_flags_need_a_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(noise_image(8, 8)))
    assert cli.main(["extract", str(image), "--model", "tiny-random", "--token-env", "X"]) == 2
    assert "need --server" in capsys.readouterr().err


# -- what the server reads and logs ----------------------------------------------------------


def test_logs_never_hold_tokens_or_image_bytes(auth_server: BackgroundServer, caplog: pytest.LogCaptureFixture) -> None:
    """Every log record of good, bad and unauthenticated calls, at DEBUG, is free of secrets."""
    marker = b"SECRET-PIXELS-0123456789"
    good = png_bytes(noise_image(40, 40))
    bad = b"\x89PNG\r\n\x1a\n" + marker * 8  # a corrupt PNG carrying a recognisable payload
    caplog.set_level(logging.DEBUG)
    with EmbeddingClient(auth_server.address, token=TOKENS[0]) as client:
        client.extract(good, request_id="log-check", timeout=TIMEOUT)
        with pytest.raises(EmbeddingError):
            client.extract(bad, timeout=TIMEOUT)
    with EmbeddingClient(auth_server.address, token="wrong-" + TOKENS[1]) as client, pytest.raises(EmbeddingError):
        client.extract(good, timeout=TIMEOUT)
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "log-check" in logged  # the request line was captured: the check looks at real logs
    for secret in (*TOKENS, "wrong-" + TOKENS[1], marker.decode(), repr(good[:16]), good[:16].hex()):
        assert secret not in logged


def test_the_server_never_opens_a_path_named_by_a_request(auth_server: BackgroundServer, tmp_path: Path) -> None:
    """Image bytes that spell a path (or URL) are bytes, not a reference: nothing is read."""
    real_image = tmp_path / "real.png"
    noise_image(40, 40).save(real_image)
    with EmbeddingClient(auth_server.address, token=TOKENS[0]) as client:
        for reference in (str(real_image).encode(), real_image.as_uri().encode(), b"http://127.0.0.1/x.png"):
            with pytest.raises(EmbeddingError) as caught:
                client.extract(reference, timeout=TIMEOUT)
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a recognised image format" in caught.value.details
