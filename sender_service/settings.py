"""SenderSettings: ServiceSettings plus where the receiver is and how the sender talks to it."""

from __future__ import annotations

from telepathy.config import ServiceSettings, require, setting, where
from telepathy.contract import DEFAULT_SENDER, WIRE_DTYPES
from telepathy.serving.channels import ClientSettings


class SenderSettings(ServiceSettings):
    port: int = setting(50051, "gRPC port (0 = pick a free one)")
    model: str = setting(DEFAULT_SENDER, "model spec: embedded preset, random:NAME, .gguf file, folder, HF id")
    receiver_addr: str = setting("127.0.0.1:50052", "receiver service HOST:PORT")
    # int8 + one fp32 scale per soft token: 4× fewer bytes than fp32 for a <1 point accuracy cost.
    wire_dtype: str = setting("int8", "default soft-token dtype on the wire: fp32, fp16, bf16, int8")
    max_relay_tokens: int = setting(48, "text path: most tokens the sender generates")
    # Deadline for a Relay whose caller set none, and the cap on the stream item's timeout_ms.
    request_timeout_s: float = setting(30.0, "deadline of a relay when the caller sets none")
    # While the stream to the receiver is down, a request waits this long for it to come back, then UNAVAILABLE.
    receiver_wait_s: float = setting(5.0, "how long a request waits for a lost receiver")
    # One stream is pinned to one receiver replica; use ≥ the number of replicas behind a DNS name.
    receiver_streams: int = setting(1, "parallel streams to the receiver address")
    receiver_tls_name: str = setting("", "name to check in the receiver's certificate")

    def _check(self) -> None:
        super()._check()
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
