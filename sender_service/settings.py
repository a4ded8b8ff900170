"""SenderSettings: ServiceSettings plus where the receiver is and how the sender talks to it."""

from __future__ import annotations

from dataclasses import dataclass

from telepathy.serving.channels import ClientSettings
from telepathy.contract import DEFAULT_SENDER, WIRE_DTYPES
from telepathy.config import ServiceSettings, env_field, require, where



@dataclass
class SenderSettings(ServiceSettings):
    port: int = env_field(50051, "TELEPATHY_PORT", "gRPC port (0 = pick a free one)")
    model: str = env_field(DEFAULT_SENDER, "TELEPATHY_MODEL", "model spec: embedded preset, random:NAME, .gguf file, folder, HF id")
    receiver_addr: str = env_field("127.0.0.1:50052", "TELEPATHY_RECEIVER_ADDR", "receiver service HOST:PORT")
    # int8 + one fp32 scale per soft token: 4× fewer bytes than fp32 for a <1 point accuracy cost.
    wire_dtype: str = env_field("int8", "TELEPATHY_WIRE_DTYPE", "default soft-token dtype on the wire: fp32, fp16, bf16, int8")
    max_relay_tokens: int = env_field(48, "TELEPATHY_MAX_RELAY_TOKENS", "text path: most tokens the sender generates")
    # Deadline for a Relay whose caller set none, and the cap on the stream item's timeout_ms.
    request_timeout_s: float = env_field(30.0, "TELEPATHY_REQUEST_TIMEOUT_S", "deadline of a relay when the caller sets none")
    # While the stream to the receiver is down, a request waits this long for it to come back, then UNAVAILABLE.
    receiver_wait_s: float = env_field(5.0, "TELEPATHY_RECEIVER_WAIT_S", "how long a request waits for a lost receiver")
    # One stream is pinned to one receiver replica; use ≥ the number of replicas behind a DNS name.
    receiver_streams: int = env_field(1, "TELEPATHY_RECEIVER_STREAMS", "parallel streams to the receiver address")
    receiver_tls_name: str = env_field("", "TELEPATHY_RECEIVER_TLS_NAME", "name to check in the receiver's certificate")

    def __post_init__(self) -> None:
        super().__post_init__()
        host, sep, port = self.receiver_addr.rpartition(":")
        require(bool(sep and host and port.isdigit() and 0 < int(port) < 65536), where(self, "receiver_addr"),
                f"expected HOST:PORT, got {self.receiver_addr!r}")
        require(self.wire_dtype in WIRE_DTYPES, where(self, "wire_dtype"),
                f"{self.wire_dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
        require(self.max_relay_tokens >= 1, where(self, "max_relay_tokens"), "must be at least 1")
        require(self.request_timeout_s > 0, where(self, "request_timeout_s"), "must be positive")
        require(1 <= self.receiver_streams <= 64, where(self, "receiver_streams"), "must be in 1..64")
        require(self.receiver_wait_s >= 0, where(self, "receiver_wait_s"), "must not be negative")

    def receiver_client(self) -> ClientSettings:
        """How to dial the receiver: the same token; TLS when this service has TLS (its cert doubles as the
        client certificate for mTLS, and TELEPATHY_TLS_CA verifies the receiver)."""
        return ClientSettings(
            auth_token=self.auth_token, tls=bool(self.tls_cert), tls_ca=self.tls_ca, tls_cert=self.tls_cert,
            tls_key=self.tls_key, tls_server_name=self.receiver_tls_name, max_message_bytes=self.max_message_bytes,
            timeout_s=self.request_timeout_s,
        )
