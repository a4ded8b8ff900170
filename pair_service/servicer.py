"""PairSenderServicer: the Sender service of the pair. A bridge-path Relay for a task both halves share runs as
one model call on the fused batcher; every other call is the sender's own."""

from __future__ import annotations

import time
import uuid

from telepathy.bridge.codec import wire_nbytes
from telepathy.protos.v1 import sender_pb2
from telepathy.sender_service.servicer import SenderServicer
from telepathy.serving.batcher import DynamicBatcher
from telepathy.serving.convert import classify_result, micros


class PairSenderServicer(SenderServicer):
    """SenderServicer plus `fused` (texts → label probabilities in one call) and `fused_tasks`, the tasks it may
    take (filled once both halves have loaded; empty = always the two-call way)."""

    def __init__(self, *args, fused: DynamicBatcher, fused_tasks: set[str], **kwargs):
        super().__init__(*args, **kwargs)
        self.fused, self.fused_tasks = fused, fused_tasks

    async def relay_bridge(self, request: sender_pb2.RelayRequest, deadline: float, received: float):
        if request.task not in self.fused_tasks:
            return await super().relay_bridge(request, deadline, received)
        meta, dtype = self._check_bridge_request(request.text, request.task, request.wire_dtype)
        probs, timing = await self.fused.submit(request.text, key=(meta.task, meta.bridge_id, dtype), deadline=deadline)
        # sender_model is the whole fused call (sender, bridge, receiver); nothing crosses a wire or a second queue.
        timings = {"sender_queue": micros(timing.queue_s), "sender_model": micros(timing.model_s), "wire": 0,
                   "receiver_queue": 0, "receiver_model": 0}
        timings["total"] = micros(time.monotonic() - received)
        self.metrics.observe_stages({k: timings[k] for k in ("sender_queue", "sender_model", "total")})
        result = classify_result(request.request_id or uuid.uuid4().hex, meta.task, meta.labels, probs, timings, meta.bridge_id)
        wire_bytes = wire_nbytes(dtype, meta.config.num_latents, meta.config.d_wire)
        self.metrics.wire_bytes.labels("bridge").observe(wire_bytes)
        return sender_pb2.RelayResponse(result=result, path=sender_pb2.PATH_BRIDGE, wire_bytes=wire_bytes)

