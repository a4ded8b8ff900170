"""Service settings: CLI > env > default, validation messages, and the docs naming every variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from telepathy.bridge.codec import WIRE_DTYPES
from telepathy.bridge.runtime.engine import SHIPPED_BRIDGES
from telepathy.bridge.models import DEFAULT_RECEIVER, DEFAULT_SENDER
from telepathy.pair_service.settings import PairSettings
from telepathy.receiver_service.settings import ReceiverSettings
from telepathy.serving.channels import ClientSettings
from telepathy.config import SHIPPED_BRIDGES as SETTINGS_SHIPPED, SettingsError, env_vars, from_sources, is_loopback
from telepathy.sender_service import settings as sender_settings
from telepathy.sender_service.settings import SenderSettings

DOCS = Path(__file__).resolve().parent.parent / "docs" / "SERVICES.md"


def test_defaults_match_the_bridge_package():
    assert SETTINGS_SHIPPED == SHIPPED_BRIDGES
    assert (SenderSettings().model, ReceiverSettings().model) == (DEFAULT_SENDER, DEFAULT_RECEIVER)
    assert sender_settings.WIRE_DTYPES == WIRE_DTYPES
    s, r = SenderSettings(), ReceiverSettings()
    assert (s.port, r.port, s.receiver_addr, s.bridges) == (50051, 50052, "127.0.0.1:50052", str(SHIPPED_BRIDGES))
    assert (s.max_batch_size, s.max_queue_delay_ms, s.max_queue_size, s.metrics_port) == (32, 2.0, 256, 0)
    assert (s.wire_dtype, s.max_text_chars, s.max_relay_tokens, s.host) == ("int8", 4000, 48, "127.0.0.1")
    assert s.max_batches_in_flight == 2
    pair = PairSettings(device="cpu", max_batch_size=8)
    assert (pair.port, pair.model, pair.receiver_model, pair.receiver_device) == (50051, DEFAULT_SENDER, DEFAULT_RECEIVER, "")
    inner = pair.receiver_settings()  # the in-process receiver: every shared setting, its own model and device
    assert (inner.model, inner.device, inner.max_batch_size) == (DEFAULT_RECEIVER, "cpu", 8)
    assert PairSettings(device="cuda:0", receiver_device="cuda:1").receiver_settings().device == "cuda:1"


def test_cli_beats_env_beats_default():
    env = {"TELEPATHY_PORT": "6000", "TELEPATHY_MAX_QUEUE_DELAY_MS": "5.5", "TELEPATHY_WARMUP": "off",
           "TELEPATHY_RECEIVER_ADDR": "10.0.0.2:7000", "TELEPATHY_WIRE_DTYPE": "bf16"}
    s = from_sources(SenderSettings, {"port": 7001, "max_batch_size": None}, env)
    assert (s.port, s.max_queue_delay_ms, s.warmup, s.receiver_addr, s.wire_dtype) == (7001, 5.5, False, "10.0.0.2:7000", "bf16")
    assert s.max_batch_size == 32
    r = from_sources(ReceiverSettings, {}, {"TELEPATHY_MAX_BATCH_SIZE": "8", "TELEPATHY_INSECURE": "1", "TELEPATHY_HOST": "0.0.0.0"})
    assert (r.max_batch_size, r.insecure, r.host) == (8, True, "0.0.0.0")


@pytest.mark.parametrize("env, message", [
    ({"TELEPATHY_PORT": "http"}, "TELEPATHY_PORT='http': invalid literal for int()"),
    ({"TELEPATHY_WARMUP": "maybe"}, "TELEPATHY_WARMUP='maybe': expected 1/0, true/false, yes/no or on/off"),
    ({"TELEPATHY_PORT": "70000"}, "--port / TELEPATHY_PORT: 70000 is not a port number"),
    ({"TELEPATHY_MAX_BATCH_SIZE": "0"}, "--max-batch-size / TELEPATHY_MAX_BATCH_SIZE: must be at least 1, got 0"),
    ({"TELEPATHY_MAX_BATCHES_IN_FLIGHT": "0"},
     "--max-batches-in-flight / TELEPATHY_MAX_BATCHES_IN_FLIGHT: must be at least 1, got 0"),
    ({"TELEPATHY_DEVICE": "tpu"}, "--device / TELEPATHY_DEVICE: 'tpu' is not one of auto, cpu, cuda, cuda:N"),
    ({"TELEPATHY_WIRE_DTYPE": "fp8"}, "--wire-dtype / TELEPATHY_WIRE_DTYPE: 'fp8' is not one of fp32, fp16, bf16, int8"),
    ({"TELEPATHY_RECEIVER_ADDR": "nohost"}, "--receiver-addr / TELEPATHY_RECEIVER_ADDR: expected HOST:PORT, got 'nohost'"),
    ({"TELEPATHY_TLS_CERT": "/nope.pem"}, "--tls-cert / --tls-key: give both or neither"),
    ({"TELEPATHY_TLS_CERT": "/nope.pem", "TELEPATHY_TLS_KEY": "/nope.key"},
     "--tls-cert / TELEPATHY_TLS_CERT: no such file: /nope.pem"),
    ({"TELEPATHY_HOST": "0.0.0.0"}, "refusing to listen on 0.0.0.0:50051 without authentication"),
])
def test_bad_settings_name_the_variable(env, message):
    with pytest.raises(SettingsError) as info:
        from_sources(SenderSettings, {}, env)
    assert message in str(info.value)


def test_loopback_detection():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "", "10.0.0.1", "example.com"))


def test_receiver_client_settings_follow_the_sender():
    c = SenderSettings(auth_token="tok", receiver_tls_name="receiver.internal").receiver_client()
    assert (c.auth_token, c.tls, c.tls_server_name) == ("tok", False, "receiver.internal")
    assert ClientSettings.from_env({"TELEPATHY_TLS_CA": "/ca.pem"}).tls  # a CA alone means TLS


def test_docs_name_every_environment_variable():
    text = DOCS.read_text(encoding="utf-8")
    names = set(env_vars(SenderSettings)) | set(env_vars(ReceiverSettings)) | set(env_vars(ClientSettings)) \
        | set(env_vars(PairSettings))
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"docs/SERVICES.md does not document {missing}"
