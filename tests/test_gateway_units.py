"""Gateway pieces that need no server: settings, the gRPC → HTTP map, request ids, API keys, the CLI wiring.

The HTTP behaviour itself is tested end to end against real services in test_gateway.py.
"""

from __future__ import annotations

import argparse

import grpc
import pytest

from telepathy.cli import build_parser
from telepathy.config import SettingsError
from telepathy.gateway import errors, serving
from telepathy.gateway.settings import ENV_VARS, GatewaySettings, add_arguments

# -- settings ---------------------------------------------------------------------------------------------------

def test_settings_defaults_match_the_documented_ones():
    s = GatewaySettings.from_env({})
    assert (s.host, s.port, s.sender_addr, s.receiver_addr) == ("127.0.0.1", 8000, "127.0.0.1:50051", "")
    assert (s.max_concurrency, s.max_text_chars, s.request_timeout_s) == (64, 4000, 30.0)
    assert s.api_keys == () and s.auth_token == ""


def test_settings_env_fallback_and_cli_override():
    env = {"TELEPATHY_GATEWAY_PORT": "9001", "TELEPATHY_SENDER_ADDR": "10.0.0.5:7000", "TELEPATHY_API_KEYS": "a, b,,c",
           "TELEPATHY_MAX_CONCURRENCY": "3", "TELEPATHY_REQUEST_TIMEOUT_S": "2.5", "TELEPATHY_AUTH_TOKEN": "tok"}
    s = GatewaySettings.from_env(env)
    assert (s.port, s.sender_addr, s.api_keys, s.max_concurrency, s.request_timeout_s, s.auth_token) == \
        (9001, "10.0.0.5:7000", ("a", "b", "c"), 3, 2.5, "tok")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--port", "9002", "--max-concurrency", "7"])
    s = GatewaySettings.from_args(args, env)
    assert (s.port, s.max_concurrency, s.sender_addr) == (9002, 7, "10.0.0.5:7000")  # flag wins, env fills the rest


def test_settings_bad_env_value_names_the_variable():
    with pytest.raises(ValueError, match=r"TELEPATHY_MAX_CONCURRENCY='lots' is not a valid int"):
        GatewaySettings.from_env({"TELEPATHY_MAX_CONCURRENCY": "lots"})


def test_settings_keep_secrets_out_of_repr():
    s = GatewaySettings(api_keys=("sekrit-key",), auth_token="sekrit-token")
    assert "sekrit" not in repr(s)


@pytest.mark.parametrize("kwargs, message", [
    (dict(port=70000), "port"),
    (dict(sender_addr="nohost"), "sender_addr"),
    (dict(max_concurrency=0), "max_concurrency"),
    (dict(max_text_chars=0), "max_text_chars"),
    (dict(request_timeout_s=0), "request_timeout_s"),
    (dict(tls_cert="/x.pem"), "tls_cert and tls_key"),
    (dict(tls_ca="/does/not/exist.pem"), "no such file"),
    (dict(api_keys=("has space",)), "api_keys"),
])
def test_settings_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GatewaySettings(**kwargs)


def test_every_env_var_is_a_field():
    fields = set(GatewaySettings.model_fields)
    assert set(ENV_VARS) <= fields


def test_settings_cli_beats_env_beats_config_file_beats_secrets_beats_default(tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text("max_concurrency: 3\nmax_text_chars: 3000\nrequest_timeout_s: 3\nprobe_timeout_s: 1.5\n",
                      encoding="utf-8")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name, value in {"TELEPATHY_MAX_CONCURRENCY": "4", "TELEPATHY_MAX_TEXT_CHARS": "4444",
                        "TELEPATHY_REQUEST_TIMEOUT_S": "4.5", "TELEPATHY_GATEWAY_PORT": "9104",
                        "TELEPATHY_API_KEYS": "k1,k2", "TELEPATHY_LOG_LEVEL": "debug"}.items():
        (secrets / name).write_text(value + "\n", encoding="utf-8")
    env = {"TELEPATHY_MAX_CONCURRENCY": "2", "TELEPATHY_MAX_TEXT_CHARS": "2222"}
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--max-concurrency", "1", "--config", str(config), "--secrets-dir", str(secrets)])
    s = GatewaySettings.from_args(args, env)
    assert (s.max_concurrency, s.max_text_chars, s.request_timeout_s, s.probe_timeout_s, s.port, s.api_keys) == \
        (1, 2222, 3.0, 1.5, 9104, ("k1", "k2"))
    assert (s.host, s.log_level) == ("127.0.0.1", "info")  # default; log_level reads no variable, so no secret file
    by_env = {**env, "TELEPATHY_CONFIG": str(config), "TELEPATHY_SECRETS_DIR": str(secrets)}
    assert GatewaySettings.from_env(by_env, max_concurrency=1) == s
    assert GatewaySettings.from_env({}) == GatewaySettings()  # no sources: the defaults


def test_settings_from_a_toml_config_file(tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text('port = 9005\nsender_addr = "sender:50051"\napi_keys = ["a", "b"]\nlog_level = "WARNING"\n',
                      encoding="utf-8")
    s = GatewaySettings.from_env({"TELEPATHY_GATEWAY_PORT": "9006"}, config_file=str(config))
    assert (s.port, s.sender_addr, s.api_keys, s.log_level) == (9006, "sender:50051", ("a", "b"), "warning")


@pytest.mark.parametrize("text, message", [
    ("port: 9000\nmax_batch_size: 8\n", "--config {path}: unknown setting for GatewaySettings: 'max_batch_size'"),
    ("- 9000\n", "--config {path}: expected a mapping of setting names to values, got list"),
    ("max_concurrency: 0\n", "max_concurrency must be >= 1, got 0"),
])
def test_settings_bad_config_file(tmp_path, text, message):
    path = tmp_path / "gateway.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SettingsError) as info:
        GatewaySettings.from_env({}, config_file=str(path))
    assert str(info.value) == message.format(path=path)


def test_gateway_command_with_a_bad_config_file_exits_2(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "bad.yaml").write_text("port: 9000\nmax_batch_size: 8\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEPATHY_")}
    r = subprocess.run([sys.executable, "-m", "telepathy", "gateway", "--config", "bad.yaml"], capture_output=True,
                       text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == "gateway: invalid settings: --config bad.yaml: unknown setting for GatewaySettings: 'max_batch_size'"


# -- errors -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code, status", [
    (grpc.StatusCode.INVALID_ARGUMENT, 422),
    (grpc.StatusCode.NOT_FOUND, 404),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (grpc.StatusCode.UNAVAILABLE, 503),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (grpc.StatusCode.UNAUTHENTICATED, 502),
    (grpc.StatusCode.PERMISSION_DENIED, 502),
    (grpc.StatusCode.FAILED_PRECONDITION, 502),
    (grpc.StatusCode.INTERNAL, 502),
    (grpc.StatusCode.UNKNOWN, 502),
])
def test_grpc_status_map(code, status):
    class FakeRpcError(grpc.RpcError):  # a value object standing in for a failed call's status, not a component
        def code(self):
            return code

        def details(self):
            return "text: too long http://10.0.0.1:50051"

        def trailing_metadata(self):
            return ((errors.FIELD_TRAILER, "text"),)

    err = errors.error_from_grpc(FakeRpcError(), "sender")
    assert err.status == status
    assert err.type == errors.ERROR_TYPES[status]
    if status >= 500:
        assert "10.0.0.1" not in err.message  # upstream details (internal addresses) stay in our log
    else:
        assert err.message == "text: too long http://10.0.0.1:50051" and err.param == "text"


def test_field_trailer_matches_the_services():
    from telepathy.serving.errors import FIELD_TRAILER

    assert errors.FIELD_TRAILER == FIELD_TRAILER


def test_error_body_is_the_envelope():
    assert errors.error_body(404, "nope", "task") == {"error": {"type": "not_found_error", "message": "nope", "param": "task"}}


# -- request ids, API keys --------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, kept", [
    ("abc-123", True), ("trace:42.a_b", True), ("x" * 128, True),
    ("", False), (None, False), ("x" * 129, False), ("has space", False), ("-leading", False), ("é", False),
    ("a\nb", False), ("abc\n", False),
])
def test_request_id_from(given, kept):
    rid = serving.request_id_from(given)
    assert (rid == given) is kept
    assert serving._SANE_REQUEST_ID.fullmatch(rid)


def test_check_api_key():
    serving.check_api_key((), None, None)  # no keys configured: open
    serving.check_api_key(("k1", "k2"), "Bearer k2", None)
    serving.check_api_key(("k1",), None, "k1")
    for auth, xkey, message in [(None, None, "missing API key"), ("Bearer nope", None, "invalid API key"),
                                (None, "nope", "invalid API key"), ("Basic k1", None, "missing API key")]:
        with pytest.raises(errors.GatewayError, match=message) as info:
            serving.check_api_key(("k1",), auth, xkey)
        assert info.value.status == 401 and info.value.headers["WWW-Authenticate"] == "Bearer"


def test_concurrency_limiter_refuses_without_waiting():
    limiter = serving.ConcurrencyLimiter(1)
    with limiter.slot():
        with pytest.raises(errors.GatewayError) as info:
            with limiter.slot():
                pass
        assert info.value.status == 429 and info.value.headers["Retry-After"] == "1"
    with limiter.slot():  # released
        assert limiter.in_flight == 1
    assert limiter.in_flight == 0


# -- CLI wiring -------------------------------------------------------------------------------------------------

def test_cli_registers_the_gateway_commands():
    parser = build_parser()
    args = parser.parse_args(["up", "--port", "8123", "--sender-model", "random:tiny-llama"])
    assert args.port == 8123 and args.sender_model == "random:tiny-llama" and args.receiver_model == "gemma-3-270m"
    args = parser.parse_args(["bench", "--out", "x.json", "--paths", "text"])
    assert args.paths == "text" and args.requests == 100 and args.concurrency == 1
    args = parser.parse_args(["healthcheck", "--grpc", "127.0.0.1:50051"])
    assert args.grpc == "127.0.0.1:50051"
    with pytest.raises(SystemExit):
        parser.parse_args(["healthcheck", "--grpc", "a:1", "--http", "http://b"])  # one target only


def test_gateway_modules_import_without_model_dependencies():
    """The gateway image has no torch, transformers, matplotlib, tqdm or filelock: the app, its CLI registration
    and the health probes must import (and build) without them."""
    import subprocess
    import sys

    code = """
import importlib.abc, sys
BLOCK = {"torch", "transformers", "gguf", "accelerate", "safetensors", "matplotlib", "tqdm", "filelock"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
sys.meta_path.insert(0, Block())
import argparse
from telepathy import testing
from telepathy.gateway import app, cli, settings
from telepathy.ops import healthcheck
parser = argparse.ArgumentParser()
cli.register(parser.add_subparsers())
app.build_app(settings.GatewaySettings.from_args(parser.parse_args(["gateway", "--port", "0"])))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
