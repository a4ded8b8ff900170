"""SenderServicer: protobuf ↔ batches. Model work is in work.py / bridge/, the receiver hop in link.py.

Relay timings (microseconds): sender_queue, sender_model (this side's batcher), receiver_queue, receiver_model
(reported by the receiver), wire (the stream round trip measured here minus the receiver's queue + model time:
serialization, network, validation), total (from receipt of the Relay to its answer).
"""

from __future__ import annotations

import time
import uuid

import grpc

from telepathy.bridge.runtime.engine import BridgeNotFoundError
from telepathy.protos.v1 import common_pb2, receiver_pb2, sender_pb2, sender_pb2_grpc
from telepathy.serving.batcher import BatchTiming, DynamicBatcher
from telepathy.serving.checks import check_id, check_text, require_task
from telepathy.serving.convert import (
    VERSION,
    bridge_info,
    limits,
    micros,
    model_info,
    task_infos,
    tensor_to_pb,
    wire_dtype_from_pb,
)
from telepathy.serving.errors import ServiceError, grpc_method, invalid
from telepathy.serving.lifecycle import EngineSlot, ServiceState, deadline_from
from telepathy.serving.logs import REQUEST_ID
from telepathy.serving.metrics import ServiceMetrics
from telepathy.serving.tracing import Tracing, current_span, set_attributes

from .link import ReceiverPool
from .settings import SenderSettings

_PATH_NAMES = {sender_pb2.PATH_BRIDGE: "bridge", sender_pb2.PATH_TEXT: "text"}


class SenderServicer(sender_pb2_grpc.SenderServicer):
    """Handed the batchers it submits to (encoder: texts → wire tensors, generator: texts → relay texts), the link
    to the receiver, and the slot its engine (bridges, model info) appears in once loaded."""

    def __init__(self, settings: SenderSettings, state: ServiceState, metrics: ServiceMetrics, engine: EngineSlot, *,
                 encoder: DynamicBatcher, generator: DynamicBatcher, link: ReceiverPool, tracing: Tracing | None = None):
        self.settings, self.state, self.metrics = settings, state, metrics
        self.tracing = tracing or Tracing()
        self._engine = engine
        self.encoder, self.generator, self.link = encoder, generator, link

    @property
    def engine(self):
        return self._engine.engine

    def _deadline(self, context) -> float:
        """The caller's deadline, capped by request_timeout_s: every hop below gets one."""
        cap = time.monotonic() + self.settings.request_timeout_s
        theirs = deadline_from(context)
        return cap if theirs is None else min(theirs, cap)

    def _check_bridge_request(self, text: str, task: str, wire_dtype: int):
        """A bridge-path request's checks → (the task's bridge meta, the wire dtype name)."""
        require_task(task, self.engine.bridges.tasks)
        check_text(text, self.settings.max_text_chars)
        try:
            meta = self.engine.bridges.resolve(task).meta
        except BridgeNotFoundError as exc:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"task: {exc}", "task") from None
        return meta, wire_dtype_from_pb(wire_dtype, self.settings.wire_dtype)

    async def _encode(self, text: str, task: str, wire_dtype: int, deadline: float):
        meta, dtype = self._check_bridge_request(text, task, wire_dtype)
        wire, timing = await self.encoder.submit(text, key=(task, meta.bridge_id, dtype), deadline=deadline)
        return wire, meta, timing

    async def _generate(self, text: str, task: str, max_tokens: int, deadline: float, field: str):
        require_task(task, self.engine.bridges.tasks)
        check_text(text, self.settings.max_text_chars)
        limit = self.settings.max_relay_tokens
        if not 0 <= max_tokens <= limit:
            raise invalid(field, f"must be between 0 and {limit} (0 = {limit}), got {max_tokens}")
        return await self.generator.submit(text, key=(task, max_tokens or limit), deadline=deadline)

    @grpc_method("Relay")
    async def Relay(self, request: sender_pb2.RelayRequest, context):
        received = time.monotonic()
        self.state.check()
        check_id(request.request_id, "request_id")
        REQUEST_ID.set(request.request_id or None)  # its log lines carry it (serving/logs.py)
        deadline = self._deadline(context)
        path = request.path or sender_pb2.PATH_BRIDGE
        if path not in _PATH_NAMES:
            raise invalid("path", f"unknown path enum value {path}; expected PATH_BRIDGE or PATH_TEXT")
        if self.tracing.on:  # the Relay server span (OTel's gRPC interceptor)
            set_attributes(current_span(), task=request.task, path=_PATH_NAMES[path], request_id=request.request_id)
        if path == sender_pb2.PATH_BRIDGE:
            return await self.relay_bridge(request, deadline, received)
        return await self.relay_text(request, deadline, received)

    async def relay_bridge(self, request: sender_pb2.RelayRequest, deadline: float, received: float):
        """Bridge path: encode here, classify on the receiver over the link."""
        wire, meta, timing = await self._encode(request.text, request.task, request.wire_dtype, deadline)
        # No bridge_id: the receiver takes its bridge for the task and checks the fingerprint, so a mismatch
        # comes back as FAILED_PRECONDITION naming both fingerprints rather than as "no such bridge id".
        item = receiver_pb2.ClassifyStreamRequest(soft_tokens=common_pb2.SoftTokens(
            task=meta.task, bridge_fingerprint=meta.fingerprint, tokens=tensor_to_pb(wire)))
        return await self._relay(request, item, timing, received, deadline, sender_pb2.PATH_BRIDGE, wire.nbytes, "")

    async def relay_text(self, request: sender_pb2.RelayRequest, deadline: float, received: float):
        """Text path: generate a relay text here, the receiver reads it."""
        (relay_text, _), timing = await self._generate(
            request.text, request.task, request.max_relay_tokens, deadline, "max_relay_tokens")
        # A long relay (up to max_relay_tokens) can spell more characters than a receiver accepts in a text; it
        # reads only its first max_input_tokens tokens anyway, so the cut loses nothing it would have read. A NUL
        # the model wrote would be refused as the client's bad input: it carries nothing, so it goes.
        relay_text = relay_text.replace("\x00", "")[:self.settings.max_text_chars]
        item = receiver_pb2.ClassifyStreamRequest(text=receiver_pb2.ClassifyTextRequest(task=request.task, text=relay_text))
        return await self._relay(request, item, timing, received, deadline, sender_pb2.PATH_TEXT,
                                 len(relay_text.encode("utf-8")), relay_text)

    async def _relay(self, request: sender_pb2.RelayRequest, item: receiver_pb2.ClassifyStreamRequest,
                     timing: BatchTiming, received: float, deadline: float, path: int, wire_bytes: int, relay_text: str):
        sent = time.monotonic()
        with self.tracing.span("receiver.stream send", "CLIENT", carrier=item.trace_context, task=request.task,
                               path=_PATH_NAMES[path], wire_bytes=wire_bytes, request_id=request.request_id) as span:
            answer = await self.link.call(item, deadline)
            set_attributes(span, label=answer.label or None)
        set_attributes(current_span() if self.tracing.on else None, wire_bytes=wire_bytes)
        round_trip = micros(time.monotonic() - sent)

        result = common_pb2.ClassifyResult()
        result.CopyFrom(answer)
        result.request_id = request.request_id or uuid.uuid4().hex
        receiver = {k: answer.timings_us.get(k, 0) for k in ("receiver_queue", "receiver_model")}
        timings = {"sender_queue": micros(timing.queue_s), "sender_model": micros(timing.model_s),
                   "wire": max(0, round_trip - sum(receiver.values())), **receiver,
                   "total": micros(time.monotonic() - received)}
        result.timings_us.clear()
        result.timings_us.update(timings)
        self.metrics.observe_stages({k: timings[k] for k in ("sender_queue", "sender_model", "wire", "total")})
        self.metrics.wire_bytes.labels(_PATH_NAMES[path]).observe(wire_bytes)
        return sender_pb2.RelayResponse(result=result, path=path, wire_bytes=wire_bytes, relay_text=relay_text)

    @grpc_method("Encode")
    async def Encode(self, request: sender_pb2.EncodeRequest, context):
        received = time.monotonic()
        self.state.check()
        check_id(request.request_id, "request_id")
        wire, meta, timing = await self._encode(request.text, request.task, request.wire_dtype, self._deadline(context))
        soft = common_pb2.SoftTokens(request_id=request.request_id, task=meta.task, bridge_id=meta.bridge_id,
                                     bridge_fingerprint=meta.fingerprint, tokens=tensor_to_pb(wire))
        timings = {"sender_queue": micros(timing.queue_s), "sender_model": micros(timing.model_s),
                   "total": micros(time.monotonic() - received)}
        return sender_pb2.EncodeResponse(soft_tokens=soft, timings_us=timings)

    @grpc_method("Generate")
    async def Generate(self, request: sender_pb2.GenerateRequest, context):
        received = time.monotonic()
        self.state.check()
        check_id(request.request_id, "request_id")
        (text, num_tokens), timing = await self._generate(
            request.text, request.task, request.max_tokens, self._deadline(context), "max_tokens")
        timings = {"sender_queue": micros(timing.queue_s), "sender_model": micros(timing.model_s),
                   "total": micros(time.monotonic() - received)}
        return sender_pb2.GenerateResponse(text=text, num_tokens=num_tokens, timings_us=timings)

    @grpc_method("Info")
    async def Info(self, request, context):
        self.state.check(need_ready=False)
        bridges = self.engine.bridges
        return sender_pb2.SenderInfoResponse(
            version=VERSION, model=model_info(self.engine.lm), bridges=[bridge_info(m) for m in bridges.metas()],
            limits=limits(self.settings, self.settings.max_relay_tokens), receiver_address=self.link.address,
            receiver_connected=self.link.connected, state=self.state.describe(), tasks=task_infos(bridges),
        )
