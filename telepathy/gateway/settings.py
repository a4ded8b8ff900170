"""Gateway settings: one dataclass, defaults commented, validated in `__post_init__`.

Values come from CLI flags, falling back to environment variables, falling back to the defaults below
(`GatewaySettings.from_env()` / `from_args()`). The gateway reads nothing from the environment after start-up.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

# field name → environment variable it falls back to.
ENV_VARS: dict[str, str] = {
    "host": "TELEPATHY_GATEWAY_HOST",
    "port": "TELEPATHY_GATEWAY_PORT",
    "sender_addr": "TELEPATHY_SENDER_ADDR",
    "receiver_addr": "TELEPATHY_RECEIVER_ADDR",
    "api_keys": "TELEPATHY_API_KEYS",
    "auth_token": "TELEPATHY_AUTH_TOKEN",
    "tls_ca": "TELEPATHY_TLS_CA",
    "tls_cert": "TELEPATHY_TLS_CERT",
    "tls_key": "TELEPATHY_TLS_KEY",
    "tls_server_name": "TELEPATHY_TLS_SERVER_NAME",
    "max_concurrency": "TELEPATHY_MAX_CONCURRENCY",
    "max_text_chars": "TELEPATHY_MAX_TEXT_CHARS",
    "request_timeout_s": "TELEPATHY_REQUEST_TIMEOUT_S",
}


@dataclass
class GatewaySettings:
    # Where uvicorn listens. Loopback by default: exposing the gateway is an explicit decision.
    host: str = "127.0.0.1"
    port: int = 8000
    # The sender service; every classification goes through it (both paths), over one long-lived channel.
    sender_addr: str = "127.0.0.1:50051"
    # The receiver service, used only by /readyz to ask its grpc.health.v1 directly. Empty = ask the sender
    # whether its receiver stream is connected (SenderInfoResponse.receiver_connected) instead.
    receiver_addr: str = ""
    # HTTP API keys clients send as `Authorization: Bearer <key>` or `X-API-Key`. Empty = no auth on /v1/*.
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # secrets stay out of logs
    # Service-to-service token the gateway sends to the sender (the services reject calls without it when set).
    auth_token: str = field(default="", repr=False)
    # Client-side TLS for the gRPC channels (on when a CA or a client cert is set): CA bundle to verify the
    # services (system roots when empty), our cert/key for mTLS, and the name to expect in the server certificate
    # when it differs from the host in sender_addr (e.g. dialing by IP).
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_server_name: str = ""
    # Requests in flight on /v1/classify + /v1/compare; one more is refused with 429 at once (no queueing:
    # queueing belongs to the services' batchers, which see the model and can shed load with RESOURCE_EXHAUSTED).
    max_concurrency: int = 64
    # Longest `text` accepted (characters); longer → 413 before anything is sent to the sender.
    max_text_chars: int = 4000
    # End-to-end budget of one HTTP request; every gRPC call gets what is left of it as its deadline.
    request_timeout_s: float = 30.0
    # Deadline of each health / info call made by /readyz and /v1/info (probes must answer fast).
    probe_timeout_s: float = 2.0
    # Text-path relay length sent to the sender; 0 = the sender's default.
    max_relay_tokens: int = 0
    # Largest request body read at all (bytes); a bigger Content-Length is refused with 413 unread.
    # Derived from max_text_chars when 0 (4 bytes per character worst case in UTF-8, plus JSON overhead).
    max_body_bytes: int = 0
    # Seconds uvicorn waits for in-flight requests on shutdown.
    graceful_shutdown_s: float = 10.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        if isinstance(self.api_keys, str):
            self.api_keys = parse_keys(self.api_keys)
        self.api_keys = tuple(self.api_keys)
        if any(not k or any(c.isspace() for c in k) for k in self.api_keys):
            raise ValueError("api_keys: keys must be non-empty and contain no whitespace")
        self.port = int(self.port)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not self.sender_addr or ":" not in self.sender_addr:
            raise ValueError(f"sender_addr must be HOST:PORT, got {self.sender_addr!r}")
        if self.receiver_addr and ":" not in self.receiver_addr:
            raise ValueError(f"receiver_addr must be HOST:PORT or empty, got {self.receiver_addr!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together (mTLS client identity)")
        for name in ("tls_ca", "tls_cert", "tls_key"):
            if getattr(self, name) and not os.path.isfile(getattr(self, name)):
                raise ValueError(f"{name}: no such file: {getattr(self, name)}")
        for name in ("max_concurrency", "max_text_chars"):
            setattr(self, name, int(getattr(self, name)))
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "probe_timeout_s"):
            setattr(self, name, float(getattr(self, name)))
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        self.max_relay_tokens = int(self.max_relay_tokens)
        if self.max_relay_tokens < 0:
            raise ValueError("max_relay_tokens must be >= 0")
        self.max_body_bytes = int(self.max_body_bytes) or 4 * self.max_text_chars + 64 * 1024
        self.graceful_shutdown_s = float(self.graceful_shutdown_s)
        self.log_level = str(self.log_level).lower()  # uvicorn wants "info", the CLI's --log-level gives "INFO"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "GatewaySettings":
        """Defaults ← environment ← explicit overrides (None overrides are ignored)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        types = {f.name: f.type for f in fields(cls)}  # annotations are strings (from __future__ import annotations)
        for name, var in ENV_VARS.items():
            raw = env.get(var, "")
            if raw == "":
                continue
            try:  # convert here so that a bad value names its variable, not just "invalid literal for int()"
                values[name] = int(raw) if types[name] == "int" else float(raw) if types[name] == "float" else raw
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a valid {types[name]}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise TypeError(f"unknown gateway settings: {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> "GatewaySettings":
        """Flags added by `add_arguments` win over the environment; unset flags (None) fall back to it."""
        overrides = {f.name: getattr(args, f.name, None) for f in fields(cls)}
        return cls.from_env(environ, **overrides)


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
    # API keys, the service token and the TLS files come from the environment only: secrets do not belong in argv
    # (`ps` shows it to every user of the machine).
