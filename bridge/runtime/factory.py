"""The one place that builds each side's model work: the eager engines, or the static-shape fast path over them.

    sender = build_sender_runtime(lm, bridges, fast_path="auto")      # SenderRuntime
    wires = sender.encode((task, bridge_id, "int8"), texts)          # B texts → B wire tensors [K, d_wire]
    receiver = build_receiver_runtime(lm, bridges, fast_path="auto")  # ReceiverRuntime
    rows = receiver.classify_latents(bridge_id, latents)             # B × [K, d_wire] → B rows of probabilities

A runtime's methods are batch functions: one call is one model call for a batch of requests, on the caller's
thread (the services' model thread). Services bind them to their batchers and never see which path runs.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

import torch

from telepathy.bridge.codec import WireTensor
from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.runtime.engine import BridgeSet, ReceiverEngine, SenderEngine

if TYPE_CHECKING:
    from telepathy.bridge.runtime.fastpath import FastPathConfig

FAST_PATH_MODES = ("auto", "on", "off")
WARMUP_LENGTHS = (16, 32, 64, 128)  # input lengths the fast path captures at start-up (tokens)


def fast_path_config(mode: str, device: torch.device | str) -> FastPathConfig | None:
    """FastPathConfig when the static-shape path should serve a model on `device`, else None (eager engines).

    "auto" means on with CUDA only: on the CPU, graphs and fused layers gain nothing over eager PyTorch.
    """
    if mode not in FAST_PATH_MODES:
        raise ValueError(f"fast path mode {mode!r} is not one of {', '.join(FAST_PATH_MODES)}")
    if mode == "off" or (mode == "auto" and torch.device(device).type != "cuda"):
        return None
    from telepathy.bridge.runtime.fastpath import FastPathConfig

    return FastPathConfig.from_env(os.environ)


def warmup_rows(batch_size: int, fast: bool) -> int:
    """Rows per warm-up batch. The fast path captures static shapes, so it warms the largest batch (and its
    buckets). Eager PyTorch has no per-shape cost, only first-call set-up, which one row pays as well as 32: on 2
    CPU cores the embedded pair's warm-up takes 0.6 s (sender) and 0.4 s (receiver) with one row against 9.4 s
    and 3.4 s with 32 (tools/bench_cold_start.py --warmup-cost), and the first requests after it are no slower
    than repeats of them."""
    return batch_size if fast else 1


class SenderRuntime:
    """The sender's batch functions over `engine`; `fast` (SenderFastPath) takes over encode_wire when given."""

    def __init__(self, engine: SenderEngine, fast=None):
        self.engine = engine
        self.encoder = fast or engine  # the same encode_wire contract, on static shapes / CUDA graphs

    @property
    def fast(self) -> bool:
        return self.encoder is not self.engine

    def encode(self, key: tuple[str, str, str], texts: list[str]) -> list[WireTensor]:
        """key = (task, bridge_id, wire dtype); B texts → B wire tensors [K, d_wire]."""
        task, bridge_id, dtype = key
        wires, _ = self.encoder.encode_wire(texts, task, dtype, bridge_id)
        return wires

    def generate(self, key: tuple[str, int], texts: list[str],
                 abandoned: threading.Event | None = None) -> list[tuple[str, int]]:
        """key = (task, max new tokens); B texts → B (relay text, its token count). Generation stops at the next
        token once `abandoned` is set (the batcher sets it when every caller of the batch has gone)."""
        task, max_tokens = key
        relays = self.engine.relay(texts, task, max_tokens, stop=abandoned)
        tok = self.engine.lm.tokenizer
        return [(r, len(tok(r, add_special_tokens=False)["input_ids"])) for r in relays]

    def warmup(self, batch_size: int, wire_dtype: str, rows: int | None = None) -> None:
        """One batch through every loaded encoder, and a short generation. On the fast path: max-size batches and
        every batch bucket a batch of ≤ batch_size can use, at lengths 16–128, so no request waits for a graph
        capture. Eager (the CPU) has no per-shape cost, only first-call set-up: one row is enough (warmup_rows)."""
        texts = ["warm-up " * 8] * (rows or warmup_rows(batch_size, self.fast))
        for bridge_id, bridge in self.engine.bridges.by_id.items():
            self.encode((bridge.meta.task, bridge_id, wire_dtype), texts)
            if self.fast:
                lengths = tuple(t for t in WARMUP_LENGTHS if t <= self.engine.max_text_tokens)
                self.encoder.warmup(bridge.meta.task, self.encoder.config.buckets_upto(batch_size),
                                    lengths, wire=wire_dtype, bridge_id=bridge_id)
        # Two tokens exercise the whole generate path without paying for a full relay per row.
        self.generate((next(iter(self.engine.bridges.by_task), self.engine.bridges.tasks.first()), 2), texts)


class ReceiverRuntime:
    """The receiver's batch functions over `engine`; `fast` (ReceiverFastPath) takes over classification when given."""

    def __init__(self, engine: ReceiverEngine, fast=None):
        self.engine = engine
        self.classifier = fast or engine  # the same classify contracts, on static shapes / CUDA graphs

    @property
    def fast(self) -> bool:
        return self.classifier is not self.engine

    def classify_latents(self, bridge_id: str, latents: list[torch.Tensor]) -> list[list[float]]:
        """B decoded soft tokens [K, d_wire] for one bridge → B rows of label probabilities."""
        meta = self.engine.bridges.by_id[bridge_id].meta
        probs, _ = self.classifier.classify_latents(torch.stack(latents), meta.task, bridge_id)  # [B, L]
        return probs.cpu().tolist()

    def classify_text(self, task: str, texts: list[str]) -> list[list[float]]:
        """B relay texts of one task → B rows of label probabilities."""
        return self.classifier.classify_text(texts, task).cpu().tolist()  # [B, L]

    def warmup(self, batch_size: int, rows: int | None = None) -> None:
        """One batch through every loaded adapter and through the text path (max-size on the fast path, one row
        eager: warmup_rows)."""
        rows = rows or warmup_rows(batch_size, self.fast)
        for bridge_id, bridge in self.engine.bridges.by_id.items():
            c = bridge.meta.config
            self.classify_latents(bridge_id, list(torch.randn(rows, c.num_latents, c.d_wire)))
            if self.fast:  # every batch bucket, so no request waits for a capture
                sizes = self.classifier.config.buckets_upto(batch_size)
                self.classifier.warmup(bridge.meta.task, sizes, wire=None, bridge_id=bridge_id)
        self.classify_text(next(iter(self.engine.bridges.by_task), self.engine.bridges.tasks.first()), ["warm-up"] * rows)


def build_sender_runtime(lm: LanguageModel, bridges: BridgeSet, fast_path: str = "auto") -> SenderRuntime:
    engine = SenderEngine(lm, bridges)
    config = fast_path_config(fast_path, lm.device)
    if config is None:
        return SenderRuntime(engine)
    from telepathy.bridge.runtime.fastpath import SenderFastPath

    return SenderRuntime(engine, SenderFastPath(engine, config))


def build_receiver_runtime(lm: LanguageModel, bridges: BridgeSet, fast_path: str = "auto") -> ReceiverRuntime:
    engine = ReceiverEngine(lm, bridges)
    config = fast_path_config(fast_path, lm.device)
    if config is None:
        return ReceiverRuntime(engine)
    from telepathy.bridge.runtime.fastpath import ReceiverFastPath

    return ReceiverRuntime(engine, ReceiverFastPath(engine, config))
