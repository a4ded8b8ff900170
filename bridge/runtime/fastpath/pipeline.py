"""Both sides in one process: FastPipeline (texts → label probabilities through sender and receiver fast paths,
one or two GPUs), and the asynchronous device→host copy its `classify_async` returns (PendingProbs)."""

from __future__ import annotations

import torch

from telepathy.bridge.runtime.fastpath.receiver import ReceiverFastPath
from telepathy.bridge.runtime.fastpath.sender import SenderFastPath


class FastPipeline:
    """Sender + receiver fast paths in one process (one or two GPUs): texts → label probabilities."""

    def __init__(self, sender: SenderFastPath, receiver: ReceiverFastPath):
        self.sender, self.receiver = sender, receiver

    def classify_ids(self, ids: torch.Tensor, lengths: torch.Tensor, task: str, bridge_id: str = "",
                     wire: str | None = None) -> torch.Tensor:
        """Tokenized inputs → probs [B, L] on the receiver's device, without a host sync; `wire` (default: the
        config's) is the codec the soft tokens go through between the two sides."""
        wire = wire or self.sender.config.wire_dtype
        values, scales, meta = self.sender.encode_ids(ids, lengths, task, bridge_id, wire=wire)
        probs, _ = self.receiver.classify_quantized(values, scales, task, meta.bridge_id, wire_dtype=wire)
        return probs

    @torch.no_grad()
    def classify_batch(self, texts: list[str], task: str, bridge_id: str = "") -> torch.Tensor:
        """texts → label probabilities [B, L] float32 on the CPU (the one host sync of the call)."""
        ids, lengths = self.sender.tokenize(texts)
        return self.classify_ids(ids, lengths, task, bridge_id).cpu()

    @torch.no_grad()
    def classify_async(self, texts: list[str], task: str, bridge_id: str = "", wire: str | None = None) -> PendingProbs:
        """classify_batch without waiting: returns once the batch is queued on the device, so a batcher can
        tokenise and queue the next batch while this one runs. `.result()` → probs [B, L] on the CPU."""
        ids, lengths = self.sender.tokenize(texts)
        return to_host_async(self.classify_ids(ids, lengths, task, bridge_id, wire))  # [B, L]: a fresh tensor


class PendingProbs:
    """A device tensor on its way to the host: `result()` is complete once its copy (and only its) has finished."""

    def __init__(self, host: torch.Tensor, done: torch.cuda.Event | None):
        self._host, self._done = host, done

    def result(self) -> torch.Tensor:
        if self._done is not None:
            self._done.synchronize()  # this batch only, not the batches queued after it
        return self._host


def to_host_async(t: torch.Tensor) -> PendingProbs:
    """Queue a device→host copy of `t` (which must not be a graph buffer that a later replay overwrites) into pinned
    memory behind the work that produces it, with an event: no stream-wide sync, so more work can be queued."""
    if t.device.type != "cuda":
        return PendingProbs(t.cpu(), None)
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(t.device))
    return PendingProbs(host, done)
