"""Service settings: CLI > env > config file > secrets dir > default, validation messages, and the docs naming
every variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from telepathy.bridge.codec import WIRE_DTYPES
from telepathy.bridge.models import DEFAULT_RECEIVER, DEFAULT_SENDER
from telepathy.bridge.runtime.engine import SHIPPED_BRIDGES
from telepathy.config import SHIPPED_BRIDGES as SETTINGS_SHIPPED
from telepathy.config import SettingsError, env_vars, from_sources, is_loopback
from telepathy.pair_service.settings import PairSettings
from telepathy.receiver_service.settings import ReceiverSettings
from telepathy.sender_service import settings as sender_settings
from telepathy.sender_service.settings import SenderSettings
from telepathy.serving.channels import ClientSettings

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


# -- one mechanism: CLI > env > --config file > secrets dir > default ---------------------------------------------

def _secrets(folder: Path, **values: str) -> Path:
    folder.mkdir(exist_ok=True)
    for name, value in values.items():
        (folder / name).write_text(value + "\n", encoding="utf-8")  # a trailing newline, as `echo` and editors leave
    return folder


def test_cli_beats_env_beats_config_file_beats_secrets_beats_default(tmp_path):
    config = tmp_path / "sender.yaml"
    config.write_text("max_batch_size: 3\nmax_queue_size: 3\nmax_text_chars: 3\n", encoding="utf-8")
    secrets = _secrets(tmp_path / "secrets", TELEPATHY_MAX_BATCH_SIZE="4", TELEPATHY_MAX_QUEUE_SIZE="4",
                       TELEPATHY_MAX_TEXT_CHARS="4", TELEPATHY_MAX_RELAY_TOKENS="4")
    env = {"TELEPATHY_MAX_BATCH_SIZE": "2", "TELEPATHY_MAX_QUEUE_SIZE": "2", "TELEPATHY_MAX_BATCHES_IN_FLIGHT": ""}
    s = from_sources(SenderSettings, {"max_batch_size": 1, "max_queue_size": None}, env, config_file=config, secrets_dir=secrets)
    assert (s.max_batch_size, s.max_queue_size, s.max_text_chars, s.max_relay_tokens, s.max_batches_in_flight) == (1, 2, 3, 4, 2)
    # The file and the folder can come from the environment too; an explicit argument beats the variable.
    by_env = {**env, "TELEPATHY_CONFIG": str(config), "TELEPATHY_SECRETS_DIR": str(secrets)}
    assert from_sources(SenderSettings, {"max_batch_size": 1}, by_env) == s
    other = tmp_path / "other.toml"
    other.write_text("max_text_chars = 5\n", encoding="utf-8")
    assert from_sources(SenderSettings, {}, by_env, config_file=other).max_text_chars == 5
    assert from_sources(SenderSettings, {}, {}).max_text_chars == 4000  # neither: the defaults


def test_direct_construction_reads_no_environment(monkeypatch):
    monkeypatch.setenv("TELEPATHY_MAX_BATCH_SIZE", "5")
    assert SenderSettings().max_batch_size == 32  # a settings object says everything about its service
    assert from_sources(SenderSettings).max_batch_size == 5  # os.environ when env is None
    s = SenderSettings()
    s.max_batch_size = 7  # mutable, as the dataclasses were
    assert s.max_batch_size == 7 and SenderSettings.port == 50051 and ReceiverSettings.port == 50052


@pytest.mark.parametrize("name, text", [
    ("receiver.yaml", "# a comment\nwarmup: false\ndevice: cpu\nmax_queue_delay_ms: 1\nmax_batch_size: 8\n"),
    ("receiver.yml", "warmup: off\ndevice: cpu\nmax_queue_delay_ms: 1.0\nmax_batch_size: '8'\n"),
    ("receiver.toml", "warmup = false\ndevice = 'cpu'\nmax_queue_delay_ms = 1\nmax_batch_size = 8\n"),
    ("receiver.json", '{"warmup": false, "device": "cpu", "max_queue_delay_ms": 1, "max_batch_size": 8}'),
])
def test_config_file_formats(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    r = from_sources(ReceiverSettings, {}, {}, config_file=path)
    assert (r.warmup, r.device, r.max_queue_delay_ms, r.max_batch_size, r.port) == (False, "cpu", 1.0, 8, 50052)


@pytest.mark.parametrize("name, text, message", [
    ("bad.yaml", "max_batch_sise: 8\nreceiver_addr: x:1\n",
     "--config {path}: unknown settings for ReceiverSettings: 'max_batch_sise' (did you mean 'max_batch_size'?), "
     "'receiver_addr'"),
    ("bad.toml", "TELEPATHY_MAX_BATCH_SIZE = 8\n",
     "--config {path}: unknown setting for ReceiverSettings: 'TELEPATHY_MAX_BATCH_SIZE' (did you mean 'max_batch_size'?)"),
    ("list.yaml", "- max_batch_size\n- 8\n", "--config {path}: expected a mapping of setting names to values, got list"),
    ("scalar.json", "8", "--config {path}: expected a mapping of setting names to values, got int"),
    ("bad.ini", "max_batch_size=8", "--config {path}: unknown format '.ini'; use .yaml, .yml, .toml or .json"),
    ("zero.yaml", "max_batch_size: 0\n", "--max-batch-size / TELEPATHY_MAX_BATCH_SIZE: must be at least 1, got 0"),
])
def test_bad_config_files_are_named(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SettingsError) as info:
        from_sources(ReceiverSettings, {}, {}, config_file=path)
    assert str(info.value) == message.format(path=path)


def test_bad_values_name_their_source(tmp_path):
    path = tmp_path / "receiver.yaml"
    path.write_text("max_batch_size: lots\n", encoding="utf-8")
    with pytest.raises(SettingsError) as info:
        from_sources(ReceiverSettings, {}, {}, config_file=path)
    assert str(info.value).startswith(f"--config {path}: max_batch_size: ") and str(info.value).endswith(", got 'lots'")
    with pytest.raises(SettingsError) as info:
        from_sources(ReceiverSettings, {}, {"TELEPATHY_MAX_BATCH_SIZE": "lots"})
    assert str(info.value) == "TELEPATHY_MAX_BATCH_SIZE='lots': invalid literal for int() with base 10: 'lots'"
    secrets = _secrets(tmp_path / "secrets", TELEPATHY_MAX_BATCH_SIZE="lots")
    with pytest.raises(SettingsError) as info:
        from_sources(ReceiverSettings, {}, {}, secrets_dir=secrets)
    assert str(info.value) == f"--secrets-dir {secrets}: TELEPATHY_MAX_BATCH_SIZE: invalid literal for int() with base 10: 'lots'"
    with pytest.raises(SettingsError) as info:
        from_sources(ReceiverSettings, {}, {"TELEPATHY_SECRETS_DIR": str(tmp_path / "nope")})
    assert str(info.value) == f"--secrets-dir {tmp_path / 'nope'}: no such directory"
    with pytest.raises(SettingsError) as info:
        ReceiverSettings(port="http")  # built directly: the option and the variable
    assert str(info.value).startswith("--port / TELEPATHY_PORT: ") and str(info.value).endswith(", got 'http'")


def test_auth_token_from_a_secrets_dir(tmp_path):
    secrets = _secrets(tmp_path / "secrets", TELEPATHY_AUTH_TOKEN="s3cret-token")
    r = from_sources(ReceiverSettings, {"host": "0.0.0.0"}, {}, secrets_dir=secrets)  # the token lets it listen on all
    assert (r.auth_token, r.security) == ("s3cret-token", "token")
    assert "s3cret" not in repr(r)
    assert from_sources(ReceiverSettings, {}, {"TELEPATHY_SECRETS_DIR": str(secrets)}).auth_token == "s3cret-token"
    assert from_sources(ReceiverSettings, {}, {"TELEPATHY_AUTH_TOKEN": "env-token"}, secrets_dir=secrets).auth_token == "env-token"
    # Clients (healthcheck, agents) read the same folder, never a config file.
    assert ClientSettings.from_env({"TELEPATHY_SECRETS_DIR": str(secrets), "TELEPATHY_CONFIG": "/nope.yaml"}).auth_token \
        == "s3cret-token"
    (secrets / "TELEPATHY_AUTH_TOKEN").write_text("", encoding="utf-8")  # empty = unset, like an empty variable
    assert from_sources(ReceiverSettings, {}, {}, secrets_dir=secrets).auth_token == ""


def _telepathy(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEPATHY_")}
    return subprocess.run([sys.executable, "-m", "telepathy", *argv], capture_output=True, text=True, timeout=120,
                          env=env, cwd=cwd)


def test_serve_with_a_bad_config_file_exits_2(tmp_path):
    (tmp_path / "bad.yaml").write_text("max_batch_size: 8\nreceiver_addr: 127.0.0.1:1\n", encoding="utf-8")
    r = _telepathy("serve", "receiver", "--config", "bad.yaml", cwd=tmp_path)  # settings fail before any model loads
    assert r.returncode == 2
    assert r.stderr.strip() == "telepathy serve receiver: --config bad.yaml: unknown setting for ReceiverSettings: 'receiver_addr'"
    (tmp_path / "zero.toml").write_text("max_batch_size = 0\n", encoding="utf-8")
    r = _telepathy("serve", "sender", "--config", "zero.toml", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == "telepathy serve sender: --max-batch-size / TELEPATHY_MAX_BATCH_SIZE: must be at least 1, got 0"
