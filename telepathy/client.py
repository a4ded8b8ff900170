"""Python clients for agents: talk to a sender with text, or to a receiver with your own soft tokens.

    from telepathy.client import SenderClient, ReceiverClient

    with SenderClient("127.0.0.1:50051") as sender, ReceiverClient("127.0.0.1:50052") as receiver:
        print(sender.relay("the match went to extra time", task="ag_news").label)     # full round trip
        soft = sender.encode("the match went to extra time", task="ag_news")           # SoftTokens, no receiver
        print(receiver.classify(soft).scores)                                          # another agent reads them
        print(receiver.classify_latents(my_latents, task="ag_news", fingerprint=fp))   # an agent's own encoder

Blocking (one sync gRPC channel per client; thread-safe). Token / TLS come from ClientSettings (by default
from the environment: TELEPATHY_AUTH_TOKEN, TELEPATHY_TLS_CA, …). With no token there and a loopback address,
the token `telepathy up` left for that port is used (see up_token_path), so a script on the same machine needs
no configuration. Every call has a deadline (`timeout`, else settings.timeout_s). Errors are grpc.RpcError:
`.code()` is the status, `.details()` the message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from telepathy.config import is_loopback
from telepathy.protos.v1 import common_pb2, receiver_pb2, receiver_pb2_grpc, sender_pb2, sender_pb2_grpc
from telepathy.serving.channels import ClientSettings, call_timeout, make_sync_channel

_DTYPES = {"fp32": common_pb2.DTYPE_FP32, "fp16": common_pb2.DTYPE_FP16, "bf16": common_pb2.DTYPE_BF16,
           "int8": common_pb2.DTYPE_INT8}
_PATHS = {"bridge": sender_pb2.PATH_BRIDGE, "text": sender_pb2.PATH_TEXT}


@dataclass(frozen=True)
class Classification:
    request_id: str
    task: str
    label: str
    label_index: int
    scores: dict[str, float]  # every label → its probability, in label order (the HTTP API's `scores`)
    timings_us: dict[str, int]
    bridge_id: str = ""

    @classmethod
    def from_pb(cls, r: common_pb2.ClassifyResult) -> Classification:
        return cls(r.request_id, r.task, r.label, r.label_index, {s.label: s.probability for s in r.scores},
                   dict(r.timings_us), r.bridge_id)


@dataclass(frozen=True)
class RelayResult(Classification):
    path: str = "bridge"
    wire_bytes: int = 0
    relay_text: str = ""


@dataclass(frozen=True)
class SoftTokens:
    """K soft tokens addressed to one bridge: what agents hand each other. `tokens` is the wire Tensor."""

    task: str
    bridge_id: str
    fingerprint: str
    tokens: common_pb2.Tensor = field(repr=False)
    request_id: str = ""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tokens.shape)

    @property
    def nbytes(self) -> int:
        return len(self.tokens.raw_data) + len(self.tokens.scales)

    def to_pb(self) -> common_pb2.SoftTokens:
        return common_pb2.SoftTokens(request_id=self.request_id, task=self.task, bridge_id=self.bridge_id,
                                     bridge_fingerprint=self.fingerprint, tokens=self.tokens)

    @classmethod
    def from_pb(cls, st: common_pb2.SoftTokens) -> SoftTokens:
        return cls(st.task, st.bridge_id, st.bridge_fingerprint, st.tokens, st.request_id)

    @classmethod
    def from_latents(cls, latents, task: str, fingerprint: str, bridge_id: str = "", wire_dtype: str = "int8") -> SoftTokens:
        """An agent's own bridge-encoder output [K, d_wire] (torch tensor) → SoftTokens (quantized like the sender)."""
        from telepathy.bridge.codec import encode  # torch only for agents that bring their own tensors

        w = encode(latents, wire_dtype)
        return cls(task, bridge_id, fingerprint, common_pb2.Tensor(dtype=_DTYPES[w.dtype], shape=list(w.shape),
                                                                   raw_data=w.data, scales=w.scales))


def up_token_path(port: int) -> Path:
    """Where `telepathy up` leaves the service token of the gRPC port it serves (mode 0600, removed on stop):
    $XDG_RUNTIME_DIR/telepathy/up-<port>.token, or ~/.cache/telepathy/up-<port>.token without XDG_RUNTIME_DIR."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "telepathy" if runtime else Path.home() / ".cache" / "telepathy"
    return base / f"up-{port}.token"


def _loopback_port(address: str) -> int | None:
    """The port of a single loopback target ("127.0.0.1:50051", "[::1]:50051", "dns:///localhost:50051"), else None."""
    target = address.strip()
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme):]
            break
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not is_loopback(host):
        return None
    return int(port)


def read_up_token(address: str) -> str:
    """The token `telepathy up` left for `address`; "" when the address is not loopback or there is none.

    Only a file owned by this user and unreadable by anyone else counts: any other file is not one `up` wrote,
    and a token planted by someone else must not be sent along."""
    port = _loopback_port(address)
    if port is None:
        return ""
    try:
        fd = os.open(up_token_path(port), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return ""
    with os.fdopen(fd, encoding="ascii", errors="replace") as f:
        st = os.fstat(f.fileno())
        if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o077):
            return ""
        return f.read(4096).strip()


class _Client:
    def __init__(self, address: str, settings: ClientSettings | None = None):
        self.address = address
        settings = settings or ClientSettings.from_env()
        if not settings.auth_token:
            token = read_up_token(address)
            if token:  # a copy: the caller's settings object may be shared with other clients
                settings = settings.model_copy(update={"auth_token": token})
        self.settings = settings
        self._channel = make_sync_channel(address, self.settings)

    def _timeout(self, timeout: float | None) -> float:
        return call_timeout(self.settings, timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SenderClient(_Client):
    def __init__(self, address: str = "127.0.0.1:50051", settings: ClientSettings | None = None):
        super().__init__(address, settings)
        self._stub = sender_pb2_grpc.SenderStub(self._channel)

    def relay(self, text: str, task: str, path: str = "bridge", *, wire_dtype: str | None = None,
              max_relay_tokens: int = 0, request_id: str = "", timeout: float | None = None) -> RelayResult:
        """Classify `text` on the receiver, through soft tokens (path="bridge") or relay text (path="text")."""
        req = sender_pb2.RelayRequest(request_id=request_id, task=task, text=text, path=_PATHS[path],
                                      max_relay_tokens=max_relay_tokens,
                                      wire_dtype=_DTYPES[wire_dtype] if wire_dtype else common_pb2.DTYPE_UNSPECIFIED)
        resp = self._stub.Relay(req, timeout=self._timeout(timeout))
        base = Classification.from_pb(resp.result)
        return RelayResult(**base.__dict__, path=path, wire_bytes=resp.wire_bytes, relay_text=resp.relay_text)

    def encode(self, text: str, task: str, *, wire_dtype: str | None = None, request_id: str = "",
               timeout: float | None = None) -> SoftTokens:
        """The soft tokens the sender would send for `text`, for an agent to pass on."""
        req = sender_pb2.EncodeRequest(request_id=request_id, task=task, text=text,
                                       wire_dtype=_DTYPES[wire_dtype] if wire_dtype else common_pb2.DTYPE_UNSPECIFIED)
        return SoftTokens.from_pb(self._stub.Encode(req, timeout=self._timeout(timeout)).soft_tokens)

    def generate(self, text: str, task: str, *, max_tokens: int = 0, timeout: float | None = None) -> str:
        """The relay text the sender would send on the text path."""
        req = sender_pb2.GenerateRequest(task=task, text=text, max_tokens=max_tokens)
        return self._stub.Generate(req, timeout=self._timeout(timeout)).text

    def info(self, timeout: float | None = None) -> sender_pb2.SenderInfoResponse:
        return self._stub.Info(sender_pb2.SenderInfoRequest(), timeout=self._timeout(timeout))


class ReceiverClient(_Client):
    def __init__(self, address: str = "127.0.0.1:50052", settings: ClientSettings | None = None):
        super().__init__(address, settings)
        self._stub = receiver_pb2_grpc.ReceiverStub(self._channel)

    def classify(self, soft: SoftTokens, timeout: float | None = None) -> Classification:
        resp = self._stub.Classify(receiver_pb2.ClassifyRequest(soft_tokens=soft.to_pb()), timeout=self._timeout(timeout))
        return Classification.from_pb(resp.result)

    def classify_latents(self, latents, task: str, fingerprint: str, *, bridge_id: str = "", wire_dtype: str = "int8",
                         timeout: float | None = None) -> Classification:
        """Classify an agent's own bridge-encoder output [K, d_wire] (a torch tensor)."""
        return self.classify(SoftTokens.from_latents(latents, task, fingerprint, bridge_id, wire_dtype), timeout)

    def classify_text(self, text: str, task: str, timeout: float | None = None) -> Classification:
        resp = self._stub.ClassifyText(receiver_pb2.ClassifyTextRequest(task=task, text=text), timeout=self._timeout(timeout))
        return Classification.from_pb(resp.result)

    def bridges(self, timeout: float | None = None) -> list[common_pb2.BridgeInfo]:
        return list(self._stub.ListBridges(receiver_pb2.ListBridgesRequest(), timeout=self._timeout(timeout)).bridges)

    def fingerprint(self, task: str, timeout: float | None = None) -> str:
        """The fingerprint soft tokens for `task` must carry to be accepted here."""
        for b in self.bridges(timeout):
            if b.task == task:
                return b.fingerprint
        raise LookupError(f"receiver {self.address} has no bridge for task {task!r}")

    def info(self, timeout: float | None = None) -> receiver_pb2.ReceiverInfoResponse:
        return self._stub.Info(receiver_pb2.ReceiverInfoRequest(), timeout=self._timeout(timeout))
