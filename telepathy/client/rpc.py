"""The gRPC clients of the agent SDK, blocking and asyncio, over one channel each (torch-free).

Every method is written once, in _SenderCalls / _ReceiverCalls, as a _Call: the stub method, the request and the
function that turns the response into the result. The blocking clients run it and return the result; the asyncio
clients (grpc.aio) return an awaitable of the same result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2

from telepathy.client.tokens import read_up_token
from telepathy.client.types import PATHS, Classification, RelayResult, SoftTokens, wire_dtype_pb
from telepathy.contract import FIELD_TRAILER
from telepathy.protos.v1 import common_pb2, receiver_pb2, receiver_pb2_grpc, sender_pb2, sender_pb2_grpc
from telepathy.serving.channels import ClientSettings, call_timeout, make_channel, make_sync_channel

T = TypeVar("T")
STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class _Call(Generic[T]):
    method: str  # the stub attribute, e.g. "Relay"
    request: Any
    parse: Callable[[Any], T]
    timeout: float | None = None


def bad_request(err: grpc.RpcError) -> dict[str, str]:
    """field → description of the google.rpc.BadRequest a failed call carries ({} when none); sync and aio errors.

    The services attach one to every error that names a request field (INVALID_ARGUMENT, NOT_FOUND of a task, …),
    as `grpc-status-details-bin`, beside the older `telepathy-error-field` trailer."""
    status = status_pb2.Status()
    for key, value in err.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY:
            status.ParseFromString(value)
    out = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            out.update({v.field: v.description for v in br.field_violations})
    return out


def error_field(err: grpc.RpcError) -> str:
    """The request field a failed call names ("" when none): the BadRequest's first, else the trailer."""
    fields = bad_request(err)
    if fields:
        return next(iter(fields))
    return next((v for k, v in err.trailing_metadata() or () if k == FIELD_TRAILER), "")


class _Base:
    def __init__(self, address: str, settings: ClientSettings | None, make: Callable[[str, ClientSettings], Any]):
        self.address = address
        settings = settings or ClientSettings.from_env()
        if not settings.auth_token:
            token = read_up_token(address)
            if token:  # a copy: the caller's settings object may be shared with other clients
                settings = settings.model_copy(update={"auth_token": token})
        self.settings = settings
        self._channel = make(address, settings)
        self._stub: Any = None

    def _invoke(self, call: _Call):
        return getattr(self._stub, call.method)(call.request, timeout=call_timeout(self.settings, call.timeout))


class _Sync(_Base):
    def __init__(self, address: str, settings: ClientSettings | None = None):
        super().__init__(address, settings, make_sync_channel)

    def _call(self, call: _Call[T]) -> T:
        return call.parse(self._invoke(call))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Async(_Base):
    """Made inside the event loop that uses it (grpc.aio channels belong to one loop)."""

    def __init__(self, address: str, settings: ClientSettings | None = None):
        super().__init__(address, settings, make_channel)

    async def _await(self, call: _Call[T]) -> T:
        return call.parse(await self._invoke(call))

    def _call(self, call: _Call[T]):  # -> Awaitable[T]
        return self._await(call)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _relay_result(path: str):
    def parse(resp: sender_pb2.RelayResponse) -> RelayResult:
        base = Classification.from_pb(resp.result)
        return RelayResult(**base.__dict__, path=path, wire_bytes=resp.wire_bytes, relay_text=resp.relay_text)
    return parse


def _result(resp) -> Classification:
    return Classification.from_pb(resp.result)


class _SenderCalls:
    """Sender methods; each returns the result (SenderClient) or an awaitable of it (AsyncSenderClient)."""

    _call: Callable[[_Call], Any]

    def relay(self, text: str, task: str, path: str = "bridge", *, wire_dtype: str | None = None,
              max_relay_tokens: int = 0, request_id: str = "", timeout: float | None = None) -> RelayResult:
        """Classify `text` on the receiver, through soft tokens (path="bridge") or relay text (path="text").
        Not retried on UNAVAILABLE (the receiver may have run it); see RETRIED_METHODS."""
        req = sender_pb2.RelayRequest(request_id=request_id, task=task, text=text, path=PATHS[path],
                                      max_relay_tokens=max_relay_tokens, wire_dtype=wire_dtype_pb(wire_dtype))
        return self._call(_Call("Relay", req, _relay_result(path), timeout))

    def encode(self, text: str, task: str, *, wire_dtype: str | None = None, request_id: str = "",
               timeout: float | None = None) -> SoftTokens:
        """The soft tokens the sender would send for `text`, for an agent to pass on."""
        req = sender_pb2.EncodeRequest(request_id=request_id, task=task, text=text, wire_dtype=wire_dtype_pb(wire_dtype))
        return self._call(_Call("Encode", req, lambda r: SoftTokens.from_pb(r.soft_tokens), timeout))

    def generate(self, text: str, task: str, *, max_tokens: int = 0, timeout: float | None = None) -> str:
        """The relay text the sender would send on the text path."""
        req = sender_pb2.GenerateRequest(task=task, text=text, max_tokens=max_tokens)
        return self._call(_Call("Generate", req, lambda r: r.text, timeout))

    def info(self, timeout: float | None = None) -> sender_pb2.SenderInfoResponse:
        return self._call(_Call("Info", sender_pb2.SenderInfoRequest(), lambda r: r, timeout))


def _fingerprint_of(task: str, address: str):
    def parse(resp: receiver_pb2.ListBridgesResponse) -> str:
        for b in resp.bridges:
            if b.task == task:
                return b.fingerprint
        raise LookupError(f"receiver {address} has no bridge for task {task!r}")
    return parse


class _ReceiverCalls:
    """Receiver methods; each returns the result (ReceiverClient) or an awaitable of it (AsyncReceiverClient)."""

    _call: Callable[[_Call], Any]
    address: str

    def classify(self, soft: SoftTokens, timeout: float | None = None) -> Classification:
        return self._call(_Call("Classify", receiver_pb2.ClassifyRequest(soft_tokens=soft.to_pb()), _result, timeout))

    def classify_latents(self, latents, task: str, fingerprint: str, *, bridge_id: str = "", wire_dtype: str = "int8",
                         timeout: float | None = None) -> Classification:
        """Classify an agent's own bridge-encoder output [K, d_wire] (a torch tensor)."""
        return self.classify(SoftTokens.from_latents(latents, task, fingerprint, bridge_id, wire_dtype), timeout)

    def classify_text(self, text: str, task: str, timeout: float | None = None) -> Classification:
        return self._call(_Call("ClassifyText", receiver_pb2.ClassifyTextRequest(task=task, text=text), _result, timeout))

    def bridges(self, timeout: float | None = None) -> list[common_pb2.BridgeInfo]:
        return self._call(_Call("ListBridges", receiver_pb2.ListBridgesRequest(), lambda r: list(r.bridges), timeout))

    def fingerprint(self, task: str, timeout: float | None = None) -> str:
        """The fingerprint soft tokens for `task` must carry to be accepted here (LookupError when none)."""
        return self._call(_Call("ListBridges", receiver_pb2.ListBridgesRequest(), _fingerprint_of(task, self.address), timeout))

    def info(self, timeout: float | None = None) -> receiver_pb2.ReceiverInfoResponse:
        return self._call(_Call("Info", receiver_pb2.ReceiverInfoRequest(), lambda r: r, timeout))


class SenderClient(_SenderCalls, _Sync):
    def __init__(self, address: str = "127.0.0.1:50051", settings: ClientSettings | None = None):
        super().__init__(address, settings)
        self._stub = sender_pb2_grpc.SenderStub(self._channel)


class ReceiverClient(_ReceiverCalls, _Sync):
    def __init__(self, address: str = "127.0.0.1:50052", settings: ClientSettings | None = None):
        super().__init__(address, settings)
        self._stub = receiver_pb2_grpc.ReceiverStub(self._channel)


class AsyncSenderClient(_SenderCalls, _Async):
    """SenderClient's methods over grpc.aio: `await sender.relay(...)`; `async with AsyncSenderClient(...)`."""

    def __init__(self, address: str = "127.0.0.1:50051", settings: ClientSettings | None = None):
        super().__init__(address, settings)
        self._stub = sender_pb2_grpc.SenderStub(self._channel)


class AsyncReceiverClient(_ReceiverCalls, _Async):
    """ReceiverClient's methods over grpc.aio: `await receiver.classify(soft)`."""

    def __init__(self, address: str = "127.0.0.1:50052", settings: ClientSettings | None = None):
        super().__init__(address, settings)
        self._stub = receiver_pb2_grpc.ReceiverStub(self._channel)
