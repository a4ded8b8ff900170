"""Service auth: bearer token on and off, refusing unauthenticated non-loopback binds, TLS and mTLS."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from telepathy.cli import main as telepathy
from telepathy.config import SettingsError
from telepathy.protos.v1 import receiver_pb2, sender_pb2
from telepathy.receiver_service.settings import ReceiverSettings
from telepathy.sender_service.settings import SenderSettings
from telepathy.serving.auth import UNAUTHENTICATED_MESSAGE
from telepathy.serving.channels import ClientSettings, make_sync_channel
from tests.services_support import (
    TIMEOUT,
    assert_status,
    metric,
    receiver_stub,
    relay,
    rpc_error,
    sender_stub,
    start_receiver,
    start_sender,
)

C = grpc.StatusCode
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def secured(tiny_bridges_dir):
    receiver = start_receiver(tiny_bridges_dir, auth_token=TOKEN)
    sender = start_sender(tiny_bridges_dir, receiver.address, auth_token=TOKEN)
    yield sender, receiver
    sender.stop()
    receiver.stop()


@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["no token", "wrong token"])
def test_calls_without_the_token_are_unauthenticated(secured, token):
    sender, receiver = secured
    settings = ClientSettings(auth_token=token) if token else ClientSettings()
    err = rpc_error(sender_stub(sender.address, settings).Relay, relay(), timeout=TIMEOUT)
    assert_status(err, C.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE, exact=True)
    err = rpc_error(receiver_stub(receiver.address, settings).ListBridges, receiver_pb2.ListBridgesRequest(), timeout=TIMEOUT)
    assert_status(err, C.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE, exact=True)
    with pytest.raises(grpc.RpcError) as info:  # the stream too
        list(receiver_stub(receiver.address, settings).ClassifyStream(iter([]), timeout=TIMEOUT))
    assert info.value.code() == C.UNAUTHENTICATED
    # ... and the right token still works, end to end (sender → receiver stream authenticated too)
    ok = ClientSettings(auth_token=TOKEN)
    assert sender_stub(sender.address, ok).Relay(relay(), timeout=TIMEOUT).result.task == "sst2"
    assert metric(sender.service.metrics.render().decode(), "telepathy_requests_total", method="Relay", code="UNAUTHENTICATED") >= 1


def test_health_needs_no_token(secured):
    for service in secured:
        stub = health_pb2_grpc.HealthStub(make_sync_channel(service.address))
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def test_sender_with_the_wrong_receiver_token_answers_unavailable(secured, tiny_bridges_dir):
    _, receiver = secured
    sender = start_sender(tiny_bridges_dir, receiver.address, auth_token="not-the-receivers", receiver_wait_s=0.5)
    try:
        err = rpc_error(sender_stub(sender.address, ClientSettings(auth_token="not-the-receivers")).Relay, relay(), timeout=TIMEOUT)
        assert_status(err, C.UNAVAILABLE, f"receiver {receiver.address} is unavailable (UNAUTHENTICATED: {UNAUTHENTICATED_MESSAGE})",
                      exact=True)
    finally:
        sender.stop()


def test_auth_is_optional_on_loopback_only():
    assert ReceiverSettings(host="127.0.0.1").security == "none"
    assert ReceiverSettings(host="localhost").security == "none"
    assert ReceiverSettings(host="::1").security == "none"
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com"):
        with pytest.raises(SettingsError, match=f"refusing to listen on {host}:50052 without authentication"):
            ReceiverSettings(host=host)
    assert SenderSettings(host="0.0.0.0", auth_token="t").security == "token"
    assert SenderSettings(host="0.0.0.0", insecure=True).security == "none"
    with pytest.raises(SettingsError, match="TELEPATHY_AUTH_TOKEN: must be printable ASCII without spaces"):
        ReceiverSettings(auth_token="two words")


def test_cli_refuses_an_unauthenticated_public_bind(monkeypatch, capsys):
    monkeypatch.delenv("TELEPATHY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("TELEPATHY_INSECURE", raising=False)
    assert telepathy(["serve", "receiver", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "telepathy serve receiver: refusing to listen on 0.0.0.0:50052 without authentication" in err
    assert "TELEPATHY_AUTH_TOKEN" in err and "--insecure" in err


# ---- TLS / mTLS -------------------------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA, and one certificate it signed for 127.0.0.1/localhost, used by both services and the client."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=telepathy-test-ca", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "svc.key", "-out", "svc.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    _openssl("x509", "-req", "-in", "svc.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "svc.pem",
             "-days", "2", "-extfile", "san.cnf", cwd=d)
    return {k: str(d / v) for k, v in dict(tls_ca="ca.pem", tls_cert="svc.pem", tls_key="svc.key").items()}


def test_mtls_between_services_and_for_clients(certs, tiny_bridges_dir):
    receiver = start_receiver(tiny_bridges_dir, **certs)
    sender = start_sender(tiny_bridges_dir, receiver.address, **certs)
    try:
        assert sender.service.settings.security == "mtls"
        client = ClientSettings(**certs)
        resp = sender_stub(sender.address, client).Relay(relay(), timeout=TIMEOUT)
        assert resp.result.task == "sst2"  # the sender reached the receiver over mTLS with its own certificate
        no_client_cert = ClientSettings(tls_ca=certs["tls_ca"])
        for settings in (no_client_cert, ClientSettings()):  # mTLS without a certificate, and plaintext
            err = rpc_error(sender_stub(sender.address, settings).Info, sender_pb2.SenderInfoRequest(), timeout=5)
            assert err.code() == C.UNAVAILABLE
    finally:
        sender.stop()
        receiver.stop()


def test_tls_without_client_certificates(certs, tiny_bridges_dir):
    tls_only = {k: certs[k] for k in ("tls_cert", "tls_key")}
    receiver = start_receiver(tiny_bridges_dir, **tls_only)
    try:
        assert receiver.service.settings.security == "tls"
        stub = receiver_stub(receiver.address, ClientSettings(tls_ca=certs["tls_ca"]))
        assert stub.ClassifyText(receiver_pb2.ClassifyTextRequest(task="sst2", text="ok"), timeout=TIMEOUT).result.task == "sst2"
    finally:
        receiver.stop()
