"""Dialing Telepathy services: one ClientSettings, one set of channel options, one factory (torch-free).

For the gateway and any other client:

    from telepathy.serving.channels import ClientSettings, make_channel, make_sync_channel, call_timeout
    from telepathy.protos.v1 import sender_pb2, sender_pb2_grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    settings = ClientSettings.from_env()        # TELEPATHY_AUTH_TOKEN, TELEPATHY_TLS_CA/CERT/KEY, …
    channel = make_channel("127.0.0.1:50051", settings)   # grpc.aio.Channel; keep one per process
    sender = sender_pb2_grpc.SenderStub(channel)
    resp = await sender.Relay(sender_pb2.RelayRequest(task="sst2", text="…"), timeout=call_timeout(settings, 5.0))
    info = await sender.Info(sender_pb2.SenderInfoRequest(), timeout=call_timeout(settings))
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)

    make_channel(address: str, settings: ClientSettings | None = None, *, options=(), with_token=True) -> grpc.aio.Channel
    make_sync_channel(address: str, settings: ClientSettings | None = None, *, options=()) -> grpc.Channel
    call_timeout(settings: ClientSettings, timeout_s: float | None = None) -> float
    call_metadata(settings: ClientSettings) -> tuple   # the token by hand, for with_token=False channels
    channel_options(max_message_bytes: int) -> list[tuple[str, int]]
    server_options(max_message_bytes: int) -> list[tuple[str, int]]

Both factories add the bearer token to every call (when set), use TLS when settings.tls is on, and set a
service config that retries the idempotent calls (RETRIED_METHODS) on UNAVAILABLE (settings.retry_attempts).
Keepalive is set so that the two ends agree: clients ping every 30 s (also with no call in flight, which is
what keeps the sender's long-lived stream healthy through idle NATs/load balancers); servers accept pings as
often as every 10 s, so they never answer GOAWAY "too_many_pings".
"""

from __future__ import annotations

import json
from typing import ClassVar

import grpc

from telepathy.config import MiB, TelepathySettings, from_sources, require, setting
from telepathy.serving.auth import SyncTokenInterceptor, aio_token_interceptors, bearer, channel_credentials

CLIENT_KEEPALIVE_MS = 30_000
SERVER_MIN_PING_INTERVAL_MS = 10_000  # must stay below CLIENT_KEEPALIVE_MS
KEEPALIVE_TIMEOUT_MS = 10_000
# Calls gRPC may send again on UNAVAILABLE (the service config's retryPolicy): they change nothing on the service
# and answer the same each time. Not Relay: its UNAVAILABLE may come after the receiver ran the item (the sender's
# link broke, the receiver drained). Not the streams. Health is left to its callers (healthcheck reports at once).
RETRIED_METHODS = {"telepathy.v1.Sender": ("Info", "Encode", "Generate"),
                   "telepathy.v1.Receiver": ("Info", "ListBridges", "Classify", "ClassifyText")}


class ClientSettings(TelepathySettings):
    """How a client reaches a service. Defaults: plaintext, no token (fine on loopback only).

    `from_env()` reads the variables, then secret files (TELEPATHY_SECRETS_DIR), never a config file: the
    TELEPATHY_CONFIG of a service's container holds the service's settings, not a client's."""

    config_env: ClassVar[str | None] = None

    auth_token: str = setting("", "bearer token sent on every call", secret=True)
    tls: bool = setting(False, "dial with TLS (on by itself when a CA or client cert is set)", env="TELEPATHY_CLIENT_TLS")
    tls_ca: str = setting("", "CA bundle the server certificate must chain to (system roots when empty)")
    tls_cert: str = setting("", "client certificate chain for mTLS")
    tls_key: str = setting("", "client private key for mTLS")
    tls_server_name: str = setting("", "name to check in the server certificate instead of the host")
    max_message_bytes: int = setting(4 * MiB, "gRPC max send/receive message size")
    # Every outgoing call gets a deadline; this is the one used when the caller gives none.
    timeout_s: float = setting(30.0, "default deadline of a call, seconds", env="TELEPATHY_CLIENT_TIMEOUT_S")
    retry_attempts: int = setting(4, "attempts of an idempotent call answered UNAVAILABLE (1 = no retries, at most 5)",
                                  env="TELEPATHY_CLIENT_RETRY_ATTEMPTS")

    def _check(self) -> None:
        super()._check()
        self.tls = bool(self.tls or self.tls_ca or self.tls_cert)
        require(bool(self.tls_cert) == bool(self.tls_key), "TELEPATHY_TLS_CERT / TELEPATHY_TLS_KEY", "give both or neither")
        require(self.timeout_s > 0, "TELEPATHY_CLIENT_TIMEOUT_S", "must be positive")
        require(self.max_message_bytes >= 64 * 1024, "TELEPATHY_MAX_MESSAGE_BYTES", "must be at least 65536")
        require(1 <= self.retry_attempts <= 5, "TELEPATHY_CLIENT_RETRY_ATTEMPTS", "must be 1 to 5")

    @classmethod
    def from_env(cls, env=None, **overrides) -> ClientSettings:
        """Overrides (None = not given) > `env` (os.environ when None) > secret files > defaults."""
        return from_sources(cls, overrides, env)


def channel_options(max_message_bytes: int) -> list[tuple[str, int | str]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Short reconnect backoff: a restarted peer on loopback/LAN is back within seconds.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        # Spread calls (and new streams) over every address a `dns:///` name resolves to, e.g. the replicas
        # behind a Kubernetes headless Service; with one address this is the same as pick_first.
        ("grpc.lb_policy_name", "round_robin"),
    ]


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 2),
        # Off: with SO_REUSEPORT a second server on the same port starts "fine" and steals half the traffic.
        ("grpc.so_reuseport", 0),
        # No max_connection_age: it would cut the sender's persistent stream on a timer.
    ]


def service_config(retry_attempts: int) -> str:
    """The channel's gRPC service config (JSON): RETRIED_METHODS retried on UNAVAILABLE, `retry_attempts` in all,
    backoff 0.1 s doubling to 1 s (randomized by gRPC), within the call's one deadline. "{}" when 1."""
    if retry_attempts <= 1:
        return "{}"
    policy = {"maxAttempts": retry_attempts, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2,
              "retryableStatusCodes": ["UNAVAILABLE"]}
    names = [{"service": svc, "method": m} for svc, methods in RETRIED_METHODS.items() for m in methods]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


def _retry_options(settings: ClientSettings) -> list[tuple[str, int | str]]:
    return [("grpc.enable_retries", int(settings.retry_attempts > 1)),
            ("grpc.service_config", service_config(settings.retry_attempts))]


def _tls_options(settings: ClientSettings) -> list[tuple[str, str]]:
    return [("grpc.ssl_target_name_override", settings.tls_server_name)] if settings.tls_server_name else []


def make_channel(address: str, settings: ClientSettings | None = None, *, options=(), with_token: bool = True,
                 interceptors=()) -> grpc.aio.Channel:
    """An asyncio channel to `address` (host:port); create it inside the event loop that will use it.

    with_token=False leaves the token out (pass `metadata=call_metadata(settings)` per call instead): grpc.aio
    runs an intercepted call written with `.write()` through an extra request-iterator task, which a
    long-lived bidi stream (the sender's link) is better off without.
    """
    settings = settings or ClientSettings()
    opts = channel_options(settings.max_message_bytes) + _retry_options(settings) + _tls_options(settings) + list(options)
    # `interceptors`: the caller's client interceptors (the gateway's tracing), outside the token one
    interceptors = [*interceptors, *(aio_token_interceptors(settings.auth_token) if settings.auth_token and with_token else ())] or None
    if settings.tls:
        creds = channel_credentials(settings.tls_ca, settings.tls_cert, settings.tls_key)
        return grpc.aio.secure_channel(address, creds, options=opts, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors)


def make_sync_channel(address: str, settings: ClientSettings | None = None, *, options=()) -> grpc.Channel:
    """A blocking channel to `address`, for scripts, agents and tests."""
    settings = settings or ClientSettings()
    opts = channel_options(settings.max_message_bytes) + _retry_options(settings) + _tls_options(settings) + list(options)
    if settings.tls:
        creds = channel_credentials(settings.tls_ca, settings.tls_cert, settings.tls_key)
        channel = grpc.secure_channel(address, creds, options=opts)
    else:
        channel = grpc.insecure_channel(address, options=opts)
    return grpc.intercept_channel(channel, SyncTokenInterceptor(settings.auth_token)) if settings.auth_token else channel


def call_metadata(settings: ClientSettings) -> tuple[tuple[str, str], ...]:
    """The auth metadata to pass by hand, for channels made with `with_token=False`."""
    return (bearer(settings.auth_token),) if settings.auth_token else ()


def call_timeout(settings: ClientSettings, timeout_s: float | None = None) -> float:
    """The deadline to put on a call: the caller's, else the settings default (never none at all)."""
    return settings.timeout_s if timeout_s is None else timeout_s
