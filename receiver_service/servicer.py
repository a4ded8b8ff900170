"""ReceiverServicer: protobuf ↔ batches. Validation is in validate.py, the model work in work.py / bridge/.

ClassifyStream is the sender's persistent stream: items are read by one task, each is handled concurrently
(so a slow batch never blocks the reader), and answers go back through one writer in completion order,
matched by request_id. A bad item gets an Error answer; the stream stays open. An item that does not decode
gets one with an empty request_id (it has none we could read), as does an item whose request_id breaks the
identifier rules (echoing it could make the answer too large to send, which would end the stream). On drain, new items are
answered UNAVAILABLE without being processed (the sender may resend them elsewhere), in-flight items are
answered, then the stream ends with OK.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from telepathy.contract import WIRE_DTYPES
from telepathy.protos.v1 import common_pb2, receiver_pb2, receiver_pb2_grpc
from telepathy.serving.batcher import BatchTiming, DynamicBatcher
from telepathy.serving.checks import check_id, check_text, id_problem, require_task
from telepathy.serving.convert import VERSION, bridge_info, classify_result, limits, micros, model_info, task_infos
from telepathy.serving.errors import (
    Undecodable,
    abort,
    caller_gone,
    grpc_method,
    invalid,
    status_of,
    takes_undecodable,
    unavailable,
)
from telepathy.serving.lifecycle import EngineSlot, ServiceState, deadline_from
from telepathy.serving.logs import REQUEST_ID
from telepathy.serving.metrics import ServiceMetrics
from telepathy.serving.tracing import Tracing, set_attributes

from .settings import ReceiverSettings
from .validate import check_soft_tokens

log = logging.getLogger(__name__)
_EOF, _DRAIN = object(), object()


class _Stream:
    def __init__(self):
        self.out: asyncio.Queue = asyncio.Queue()  # responses, _EOF, _DRAIN
        self.busy = 0  # items accepted and not yet answered
        self.tasks: set[asyncio.Task] = set()
        self.ended = False  # client half-closed, or drain began


class ReceiverServicer(receiver_pb2_grpc.ReceiverServicer):
    """Handed the batchers it submits to (soft_tokens: decoded soft tokens → probabilities, texts: relay texts →
    probabilities) and the slot its engine (bridges, model info) appears in once loaded."""

    def __init__(self, settings: ReceiverSettings, state: ServiceState, metrics: ServiceMetrics, engine: EngineSlot,
                 *, soft_tokens: DynamicBatcher, texts: DynamicBatcher, tracing: Tracing | None = None):
        self.settings, self.state, self.metrics = settings, state, metrics
        self.tracing = tracing or Tracing()
        self._engine = engine
        self.soft_tokens, self.texts = soft_tokens, texts
        self._streams: set[_Stream] = set()

    @property
    def engine(self):
        return self._engine.engine

    # ---- shared paths ---------------------------------------------------------------------------------------
    def _result(self, request_id: str, task: str, labels, probs, timing: BatchTiming, received: float,
                bridge_id: str = "") -> common_pb2.ClassifyResult:
        timings = {"receiver_queue": micros(timing.queue_s), "receiver_model": micros(timing.model_s)}
        self.metrics.observe_stages(timings)
        timings["total"] = micros(time.monotonic() - received)
        return classify_result(request_id, task, labels, probs, timings, bridge_id)

    async def _classify(self, st: common_pb2.SoftTokens, deadline: float | None, received: float, prefix: str):
        item = check_soft_tokens(st, self.engine.bridges, prefix)
        meta = item.bridge.meta
        probs, timing = await self.soft_tokens.submit(item.latents, key=meta.bridge_id, deadline=deadline)
        return self._result(st.request_id, meta.task, meta.labels, probs, timing, received, meta.bridge_id)

    async def _classify_text(self, req: receiver_pb2.ClassifyTextRequest, deadline: float | None, received: float,
                             prefix: str = ""):
        check_id(req.request_id, f"{prefix}request_id")
        spec = require_task(req.task, self.engine.bridges.tasks, f"{prefix}task")
        # An empty relay text is a legitimate (if useless) relay: the sender's LLM may produce one.
        check_text(req.text, self.settings.max_text_chars, f"{prefix}text", allow_empty=True)
        probs, timing = await self.texts.submit(req.text, key=spec.name, deadline=deadline)
        return self._result(req.request_id, spec.name, spec.labels, probs, timing, received)

    async def classify_item(self, req: receiver_pb2.ClassifyStreamRequest, deadline: float | None,
                            received: float) -> common_pb2.ClassifyResult:
        """One stream item (soft tokens or a relay text) → its result. Also the in-process way in (pair_service)."""
        if req.HasField("soft_tokens") == req.HasField("text"):
            raise invalid("soft_tokens", "set exactly one of soft_tokens and text")
        if req.HasField("soft_tokens"):
            return await self._classify(req.soft_tokens, deadline, received, "soft_tokens")
        return await self._classify_text(req.text, deadline, received, "text.")

    # ---- unary RPCs -----------------------------------------------------------------------------------------
    @grpc_method("Classify")
    async def Classify(self, request, context):
        received = time.monotonic()
        self.state.check()
        if not request.HasField("soft_tokens"):
            raise invalid("soft_tokens", "is required")
        result = await self._classify(request.soft_tokens, deadline_from(context), received, "soft_tokens")
        return receiver_pb2.ClassifyResponse(result=result)

    @grpc_method("ClassifyText")
    async def ClassifyText(self, request, context):
        received = time.monotonic()
        self.state.check()
        return receiver_pb2.ClassifyTextResponse(result=await self._classify_text(request, deadline_from(context), received))

    @grpc_method("ListBridges")
    async def ListBridges(self, request, context):
        self.state.check(need_ready=False)
        return receiver_pb2.ListBridgesResponse(bridges=[bridge_info(m) for m in self.engine.bridges.metas()])

    @grpc_method("Info")
    async def Info(self, request, context):
        self.state.check(need_ready=False)
        bridges = self.engine.bridges
        return receiver_pb2.ReceiverInfoResponse(
            version=VERSION, model=model_info(self.engine.lm), tasks=sorted(bridges.by_task),
            limits=limits(self.settings), wire_dtypes=list(WIRE_DTYPES), state=self.state.describe(),
            catalog=task_infos(bridges),
        )

    # ---- the stream -----------------------------------------------------------------------------------------
    @property
    def stream_items_in_flight(self) -> int:
        """Items accepted on open streams and not answered yet."""
        return sum(stream.busy for stream in self._streams)

    def drain(self) -> None:
        """Tell every open stream to stop taking items and to end once its in-flight items are answered."""
        for stream in list(self._streams):
            stream.out.put_nowait(_DRAIN)

    @takes_undecodable
    async def ClassifyStream(self, request_iterator, context):
        try:
            self.state.check()
        except Exception as exc:  # noqa: BLE001 - mapped right here
            err = status_of(exc)
            self.metrics.observe_request("ClassifyStream", err.code, 0.0)
            await abort(context, err)
        # Initial metadata now, so the sender knows at once that the stream is up (auth passed, not draining).
        await context.send_initial_metadata(())
        stream = _Stream()
        self._streams.add(stream)
        reader = asyncio.create_task(self._read(request_iterator, stream))
        try:
            while True:
                item = await stream.out.get()
                if item is _EOF or item is _DRAIN:
                    stream.ended = True
                else:
                    try:
                        await context.write(item)
                    except grpc.aio.InternalError:  # the call is over (deadline, caller gone): nobody reads on
                        raise asyncio.CancelledError from None
                if stream.ended and stream.busy == 0 and stream.out.empty():
                    break
        finally:
            reader.cancel()
            for task in list(stream.tasks):
                task.cancel()
            self._streams.discard(stream)
        if caller_gone(context) is not None:  # its deadline passed: sending OK now would fail (errors.abort)
            raise asyncio.CancelledError
        self.metrics.observe_request("ClassifyStream", grpc.StatusCode.OK, 0.0)

    async def _read(self, request_iterator, stream: _Stream) -> None:
        try:
            async for req in request_iterator:
                received = time.monotonic()
                if isinstance(req, Undecodable):
                    self.metrics.observe_request("ClassifyStream.item", grpc.StatusCode.INVALID_ARGUMENT, 0.0)
                    stream.out.put_nowait(_error("", req.error()))
                    continue
                if stream.ended or self.state.draining:
                    self.metrics.observe_request("ClassifyStream.item", grpc.StatusCode.UNAVAILABLE, 0.0)
                    stream.out.put_nowait(_error(_reply_id(req), unavailable("receiver is draining; item not processed")))
                    continue
                stream.busy += 1
                task = asyncio.create_task(self._item(req, received, stream))
                stream.tasks.add(task)
                task.add_done_callback(stream.tasks.discard)
        except Exception as exc:  # noqa: BLE001 - the client broke the stream off; the handler ends with it
            log.debug("stream reader stopped: %r", exc)
        finally:
            stream.out.put_nowait(_EOF)

    async def _item(self, req: receiver_pb2.ClassifyStreamRequest, received: float, stream: _Stream) -> None:
        if not self.tracing.on:
            return await self._answer(req, received, stream, None)
        carrier = getattr(req, "trace_context", None)  # the sender's span for this item (an Undecodable has none)
        text = isinstance(req, receiver_pb2.ClassifyStreamRequest) and req.HasField("text")
        with self.tracing.span("receiver.item", "SERVER", parent=dict(carrier) if carrier else None,
                               path="text" if text else "bridge") as span:
            if isinstance(req, receiver_pb2.ClassifyStreamRequest):
                set_attributes(span, task=req.text.task if text else req.soft_tokens.task, wire_bytes=req.ByteSize())
            await self._answer(req, received, stream, span)

    async def _answer(self, req: receiver_pb2.ClassifyStreamRequest, received: float, stream: _Stream, span) -> None:
        request_id = _reply_id(req)
        REQUEST_ID.set(request_id or None)  # the item's id on the stream (serving/logs.py)
        code = grpc.StatusCode.OK
        try:
            if req.timeout_ms < 0:
                raise invalid("timeout_ms", f"must not be negative, got {req.timeout_ms}")
            deadline = received + req.timeout_ms / 1000 if req.timeout_ms else None
            result = await self.classify_item(req, deadline, received)
            response = receiver_pb2.ClassifyStreamResponse(request_id=request_id, result=result)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - per-item errors travel in the stream
            err = status_of(exc)
            code = err.code
            response = _error(request_id, err)
        finally:
            stream.busy -= 1
        self.metrics.observe_request("ClassifyStream.item", code, time.monotonic() - received)
        set_attributes(span, status=code.name)
        stream.out.put_nowait(response)


def _reply_id(req: receiver_pb2.ClassifyStreamRequest) -> str:
    """The id an item's answer carries: its own, unless that breaks the identifier rules (its Error says so)."""
    request_id = req.soft_tokens.request_id or req.text.request_id
    return request_id if id_problem(request_id) is None else ""


def _error(request_id: str, err) -> receiver_pb2.ClassifyStreamResponse:
    return receiver_pb2.ClassifyStreamResponse(
        request_id=request_id, error=common_pb2.Error(code=err.code.value[0], message=err.message, field=err.field)
    )
