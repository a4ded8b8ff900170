"""Gateway settings: one model of telepathy.config's settings mechanism, defaults commented, validated once.

Values come from CLI flags > TELEPATHY_* env vars > the `--config` file (TELEPATHY_CONFIG) > secret files
(`--secrets-dir`, TELEPATHY_SECRETS_DIR) > the defaults below (`GatewaySettings.from_env()` / `from_args()`).
Constructing `GatewaySettings(...)` directly takes the given values and the defaults only. The gateway reads
nothing from the environment after start-up.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

from pydantic import field_validator

from telepathy.config import SettingsError, TelemetrySettings, env_name, from_sources, setting


class GatewaySettings(TelemetrySettings):
    # Where uvicorn listens. Loopback by default: exposing the gateway is an explicit decision.
    host: str = setting("127.0.0.1", "listen address", env="TELEPATHY_GATEWAY_HOST")
    port: int = setting(8000, "listen port", env="TELEPATHY_GATEWAY_PORT")
    # The sender service; every classification goes through it (both paths), over one long-lived channel.
    sender_addr: str = setting("127.0.0.1:50051", "the sender service HOST:PORT")
    # The receiver service, used only by /readyz to ask its grpc.health.v1 directly. Empty = ask the sender
    # whether its receiver stream is connected (SenderInfoResponse.receiver_connected) instead.
    receiver_addr: str = setting("", "the receiver HOST:PORT for /readyz and /v1/info; empty = ask the sender")
    # HTTP API keys clients send as `Authorization: Bearer <key>` or `X-API-Key`. Empty = no auth on /v1/*.
    # A comma-separated string (env, secret file) or a list (config file).
    api_keys: tuple[str, ...] = setting((), "comma-separated HTTP API keys", secret=True)  # secrets stay out of logs
    # Service-to-service token the gateway sends to the sender (the services reject calls without it when set).
    auth_token: str = setting("", "service token sent to the services", secret=True)
    # Client-side TLS for the gRPC channels (on when a CA or a client cert is set): CA bundle to verify the
    # services (system roots when empty), our cert/key for mTLS, and the name to expect in the server certificate
    # when it differs from the host in sender_addr (e.g. dialing by IP).
    tls_ca: str = setting("", "CA bundle to verify the services")
    tls_cert: str = setting("", "client certificate for mTLS")
    tls_key: str = setting("", "client key for mTLS")
    tls_server_name: str = setting("", "name to expect in the services' certificates")
    # Requests in flight on /v1/classify + /v1/compare; one more is refused with 429 at once (no queueing:
    # queueing belongs to the services' batchers, which see the model and can shed load with RESOURCE_EXHAUSTED).
    max_concurrency: int = setting(64, "requests in flight before 429")
    # Longest `text` accepted (characters); longer → 413 before anything is sent to the sender.
    max_text_chars: int = setting(4000, "longest text before 413")
    # End-to-end budget of one HTTP request; every gRPC call gets what is left of it as its deadline.
    request_timeout_s: float = setting(30.0, "end-to-end budget of one request")
    # The rest read no environment variable (flags and the config file only): TELEPATHY_MAX_RELAY_TOKENS, for one,
    # is the sender's own setting.
    # Deadline of each health / info call made by /readyz, /v1/info and /v1/tasks (probes must answer fast).
    probe_timeout_s: float = setting(2.0, "deadline of the /readyz, /v1/info and /v1/tasks calls to the services", env=None)
    # Text-path relay length sent to the sender; 0 = the sender's default.
    max_relay_tokens: int = setting(0, "text-path relay length (0 = sender default)", env=None)
    # Largest request body read at all (bytes): a bigger Content-Length is refused with 413 unread, a body without
    # one (chunked) with 413 as soon as it grows past the limit.
    # Derived from max_text_chars when 0 (4 bytes per character worst case in UTF-8, plus JSON overhead).
    max_body_bytes: int = setting(0, "largest request body (0 = 4 × max_text_chars + 64 KiB)", env=None)
    # Seconds a client has to deliver its whole body once its headers are in; then 408 and the connection closes.
    # Without it a client that announces a body and sends it slowly (or never) holds a connection forever.
    body_timeout_s: float = setting(10.0, "time to deliver the whole request body before 408", env=None)
    # Seconds uvicorn waits for in-flight requests on shutdown.
    graceful_shutdown_s: float = setting(10.0, "how long uvicorn waits for in-flight requests on shutdown", env=None)
    log_level: str = setting("info", "uvicorn log level", env=None)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        return parse_keys(value) if isinstance(value, str) else value

    def _check(self) -> None:
        super()._check()
        if any(not k or any(c.isspace() for c in k) for k in self.api_keys):
            raise SettingsError("api_keys: keys must be non-empty and contain no whitespace")
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port must be in 0..65535, got {self.port}")
        if not self.sender_addr or ":" not in self.sender_addr:
            raise SettingsError(f"sender_addr must be HOST:PORT, got {self.sender_addr!r}")
        if self.receiver_addr and ":" not in self.receiver_addr:
            raise SettingsError(f"receiver_addr must be HOST:PORT or empty, got {self.receiver_addr!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SettingsError("tls_cert and tls_key go together (mTLS client identity)")
        for name in ("tls_ca", "tls_cert", "tls_key"):
            if getattr(self, name) and not os.path.isfile(getattr(self, name)):
                raise SettingsError(f"{name}: no such file: {getattr(self, name)}")
        for name in ("max_concurrency", "max_text_chars"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "probe_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise SettingsError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_relay_tokens < 0:
            raise SettingsError("max_relay_tokens must be >= 0")
        self.max_body_bytes = self.max_body_bytes or 4 * self.max_text_chars + 64 * 1024
        self.log_level = self.log_level.lower()  # uvicorn wants "info", the CLI's --log-level gives "INFO"

    @classmethod
    def _env_value_error(cls, var: str, raw: str, typ: Any, exc: ValueError) -> str:
        return f"{var}={raw!r} is not a valid {getattr(typ, '__name__', typ)}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, config_file: str | None = None,
                 secrets_dir: str | None = None, **overrides: Any) -> GatewaySettings:
        """Explicit overrides (None = not given) > environment (os.environ when None) > config file > secret files
        > defaults. `config_file` / `secrets_dir` default to $TELEPATHY_CONFIG / $TELEPATHY_SECRETS_DIR."""
        unknown = set(overrides) - set(cls.model_fields)
        if unknown:
            raise SettingsError(f"unknown gateway settings: {sorted(unknown)}")
        return from_sources(cls, overrides, environ, config_file=config_file, secrets_dir=secrets_dir)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> GatewaySettings:
        """Flags added by `add_arguments` win over the environment; unset flags (None) fall back to it."""
        overrides = {name: getattr(args, name, None) for name in cls.model_fields}
        return cls.from_env(environ, config_file=getattr(args, "config", None),
                            secrets_dir=getattr(args, "secrets_dir", None), **overrides)


# field name → environment variable it falls back to (the fields that read one).
ENV_VARS: dict[str, str] = {
    name: var for name in GatewaySettings.model_fields if (var := env_name(GatewaySettings, name)) is not None
}


def parse_keys(value: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in value.split(",") if k.strip())


def add_arguments(parser: argparse.ArgumentParser, *, include_listen: bool = True) -> None:
    """Gateway flags; each defaults to None so that `from_args` can fall back to the environment."""
    if include_listen:
        parser.add_argument("--host", default=None, help="listen address [$TELEPATHY_GATEWAY_HOST, 127.0.0.1]")
        parser.add_argument("--port", type=int, default=None, help="listen port [$TELEPATHY_GATEWAY_PORT, 8000]")
    parser.add_argument("--sender-addr", default=None, help="sender gRPC HOST:PORT [$TELEPATHY_SENDER_ADDR, 127.0.0.1:50051]")
    parser.add_argument("--receiver-addr", default=None,
                        help="receiver gRPC HOST:PORT for /readyz [$TELEPATHY_RECEIVER_ADDR; empty = ask the sender]")
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests in flight before 429 [$TELEPATHY_MAX_CONCURRENCY, 64]")
    parser.add_argument("--max-text-chars", type=int, default=None, help="longest text before 413 [$TELEPATHY_MAX_TEXT_CHARS, 4000]")
    parser.add_argument("--request-timeout-s", type=float, default=None, help="per-request deadline [$TELEPATHY_REQUEST_TIMEOUT_S, 30]")
    parser.add_argument("--max-relay-tokens", type=int, default=None, help="text-path relay length (0 = sender default)")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML, TOML or JSON file of gateway settings, keys as the field names "
                             "(below the flags and env vars) [$TELEPATHY_CONFIG]")
    parser.add_argument("--secrets-dir", metavar="DIR", default=None,
                        help="folder of secret files named like the variables, e.g. DIR/TELEPATHY_API_KEYS "
                             "(below the config file) [$TELEPATHY_SECRETS_DIR; off when unset]")
    # API keys, the service token and the TLS files come from the environment, the config file or secret files
    # only: secrets do not belong in argv (`ps` shows it to every user of the machine).
