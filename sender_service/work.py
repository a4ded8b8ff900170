"""The sender's batch functions: what one model call does for a batch of requests. Runs on the model thread."""

from __future__ import annotations

from telepathy.bridge.codec import WireTensor
from telepathy.bridge.runtime.engine import SenderEngine
from telepathy.bridge.tasks import TASKS


class SenderWork:
    def __init__(self, engine: SenderEngine, fast=None):
        self.engine = engine
        # bridge.fastpath.SenderFastPath: the same encode_wire contract on static shapes / CUDA graphs
        self.encoder = fast or engine

    def encode(self, key: tuple[str, str, str], texts: list[str]) -> list[WireTensor]:
        """key = (task, bridge_id, wire dtype); B texts → B wire tensors [K, d_wire]."""
        task, bridge_id, dtype = key
        wires, _ = self.encoder.encode_wire(texts, task, dtype, bridge_id)
        return wires

    def generate(self, key: tuple[str, int], texts: list[str]) -> list[tuple[str, int]]:
        """key = (task, max new tokens); B texts → B (relay text, its token count)."""
        task, max_tokens = key
        relays = self.engine.relay(texts, task, max_tokens)
        tok = self.engine.lm.tokenizer
        return [(r, len(tok(r, add_special_tokens=False)["input_ids"])) for r in relays]

    def warmup(self, batch_size: int, wire_dtype: str) -> None:
        """One max-size batch through every loaded encoder, and a short max-size generation. On the fast path, every
        batch bucket a batch of ≤ batch_size can use, at lengths 16–128, so no request waits for a graph capture."""
        texts = ["warm-up " * 8] * batch_size
        for bridge_id, bridge in self.engine.bridges.by_id.items():
            self.encode((bridge.meta.task, bridge_id, wire_dtype), texts)
            if self.encoder is not self.engine:
                lengths = tuple(t for t in (16, 32, 64, 128) if t <= self.engine.max_text_tokens)
                self.encoder.warmup(bridge.meta.task, self.encoder.config.buckets_upto(batch_size),
                                    lengths, wire=wire_dtype, bridge_id=bridge_id)
        # Two tokens exercise the whole generate path without paying for a full relay per row.
        self.generate((next(iter(self.engine.bridges.by_task), next(iter(TASKS))), 2), texts)
