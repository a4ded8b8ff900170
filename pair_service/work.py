"""The pair's fused batch function: texts → label probabilities in one model call. Runs on the model thread."""

from __future__ import annotations

import torch

from telepathy.bridge.codec import decode_batch
from telepathy.bridge.runtime.factory import ReceiverRuntime, SenderRuntime
from telepathy.serving.batcher import Deferred


def shared_tasks(sender: SenderRuntime, receiver: ReceiverRuntime) -> set[str]:
    """The tasks whose sender and receiver bridges share a fingerprint (and so a bridge id).

    Only those run fused; any other task goes the two-service way, whose checks then answer NOT_FOUND or
    FAILED_PRECONDITION exactly as two separate services would.
    """
    ours, theirs = sender.engine.bridges.by_task, receiver.engine.bridges.by_task
    return {task for task in ours if task in theirs and theirs[task].meta.fingerprint == ours[task].meta.fingerprint}


class PairWork:
    def __init__(self, sender: SenderRuntime, receiver: ReceiverRuntime):
        self.sender, self.receiver = sender, receiver
        self.fused_tasks = shared_tasks(sender, receiver)
        # Both sides on the static-shape fast path: the quantized soft tokens stay on the device.
        self.pipeline = None
        if sender.fast and receiver.fast:
            from telepathy.bridge.runtime.fastpath import FastPipeline

            self.pipeline = FastPipeline(sender.encoder, receiver.classifier)

    @torch.no_grad()
    def classify(self, key: tuple[str, str, str], texts: list[str]) -> list[list[float]] | Deferred:
        """key = (task, bridge id, wire dtype); B texts → B rows of label probabilities. On the fast path the rows
        come as a Deferred: the work is queued on the device and the model thread is free for the next batch."""
        task, bridge_id, dtype = key
        if self.pipeline is not None:
            pending = self.pipeline.classify_async(texts, task, bridge_id, wire=dtype)  # [B, L], copy queued
            return Deferred(lambda: pending.result().tolist())
        # The eager engines: the same bytes the stream would carry, decoded as the receiver would.
        wires, meta = self.sender.encoder.encode_wire(texts, task, dtype, bridge_id)
        latents = decode_batch(wires, (meta.config.num_latents, meta.config.d_wire))  # [B, K, D] float32
        probs, _ = self.receiver.classifier.classify_latents(latents, task, bridge_id)
        return probs.cpu().tolist()  # [B, L]

    def warmup(self, batch_size: int, wire_dtype: str) -> None:
        """A max-size fused batch per shared task; on the fast path also the receiver's graphs for quantized
        soft tokens at every batch bucket (the receiver's own warm-up captured the float ones)."""
        texts = ["warm-up " * 8] * batch_size
        for task in self.fused_tasks:
            bridge_id = self.sender.engine.bridges.by_task[task].meta.bridge_id
            rows = self.classify((task, bridge_id, wire_dtype), texts)
            if isinstance(rows, Deferred):
                rows.wait()
            if self.pipeline is not None:
                fast = self.pipeline.receiver
                fast.warmup(task, fast.config.buckets_upto(batch_size), wire=wire_dtype, bridge_id=bridge_id)
