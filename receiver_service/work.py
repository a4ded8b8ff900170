"""The receiver's batch functions: what one model call does for a batch of requests. Runs on the model thread."""

from __future__ import annotations

import torch

from telepathy.bridge.runtime.engine import ReceiverEngine
from telepathy.bridge.tasks import TASKS


class ReceiverWork:
    def __init__(self, engine: ReceiverEngine, fast=None):
        self.engine = engine
        # bridge.fastpath.ReceiverFastPath: the same classify contracts on static shapes / CUDA graphs
        self.classifier = fast or engine

    def classify_latents(self, bridge_id: str, latents: list[torch.Tensor]) -> list[list[float]]:
        """B decoded soft tokens [K, d_wire] for one bridge → B rows of label probabilities."""
        meta = self.engine.bridges.by_id[bridge_id].meta
        probs, _ = self.classifier.classify_latents(torch.stack(latents), meta.task, bridge_id)  # [B, L]
        return probs.cpu().tolist()

    def classify_text(self, task: str, texts: list[str]) -> list[list[float]]:
        """B relay texts of one task → B rows of label probabilities."""
        return self.classifier.classify_text(texts, task).cpu().tolist()  # [B, L]

    def warmup(self, batch_size: int) -> None:
        """One max-size batch through every loaded adapter and through the text path."""
        for bridge_id, bridge in self.engine.bridges.by_id.items():
            c = bridge.meta.config
            self.classify_latents(bridge_id, list(torch.randn(batch_size, c.num_latents, c.d_wire)))
            if self.classifier is not self.engine:  # fast path: every batch bucket, so no request waits for a capture
                sizes = self.classifier.config.buckets_upto(batch_size)
                self.classifier.warmup(bridge.meta.task, sizes, wire=None, bridge_id=bridge_id)
        self.classify_text(next(iter(self.engine.bridges.by_task), next(iter(TASKS))), ["warm-up"] * batch_size)
