"""What tools/gpu_latency.py measures with: timing and statistics, the bench inputs and model pair, the
weight-bandwidth floor, and an in-process dynamic batcher.

  timing      sync, time_events (CUDA events, or the host clock on CPU), time_wall (host clock, synchronised),
              stats (p50 / p99 / mean / min / max / n of a list of milliseconds), copy_bandwidth
  inputs      texts_with_tokens: AG News test articles cut or extended to exactly n sender tokens (also the
              inputs of tools/bench_services.py --input-tokens)
  pair        build (sender + receiver + a random-init bridge, in memory), eager_bridge (the eager reference),
              weight_bytes / floor_bytes (the bytes of weights the batch-1 bridge path must read)
  batching    DynamicBatcher (one worker thread, max batch, max delay, optionally pipelined) and run_batcher
              (closed-loop clients against it: requests/s and per-request latency)

A sibling module of the scripts, not part of the package: `python tools/gpu_latency.py` (or
tools/bench_services.py) runs with tools/ first on sys.path (Python puts a script's own folder there), so the
scripts import it as `bench_support`.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch

from telepathy.bridge.checkpoint import BridgeMeta
from telepathy.bridge.codec import quantize
from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.resampler import Bridge, BridgeConfig
from telepathy.bridge.runtime.engine import BridgeSet, LoadedBridge, ReceiverEngine, SenderEngine
from telepathy.bridge.runtime.fastpath import FastPathConfig, dequantize
from telepathy.bridge.tasks import BUILTIN_TASKS, get_task
from telepathy.bridge.training.data import load_split

TASK = next(iter(BUILTIN_TASKS))  # the first built-in task: news articles of mixed lengths


# ---- timing -----------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_events(fn, device: torch.device, runs: int, warmup: int) -> list[float]:
    """Milliseconds per call: CUDA events around each call (GPU idle before each, like a lone request)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return out


def time_wall(fn, device: torch.device, runs: int, warmup: int) -> list[float]:
    """Milliseconds per call on the host clock, synchronised (host work such as tokenizing included)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def stats(ms: list[float]) -> dict:
    a = np.asarray(ms, dtype=np.float64)
    return {"p50": float(np.median(a)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean()),
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def copy_bandwidth(device: torch.device, nbytes: int) -> dict:
    """Large device-to-device copy; bandwidth counts bytes read plus bytes written (METHOD.md)."""
    src = torch.randn(nbytes // 4, device=device)  # random data, never zeros
    dst = torch.empty_like(src)
    ms = time_events(lambda: dst.copy_(src), device, runs=20, warmup=3)  # noqa: F821 - called here, del'd below
    assert torch.equal(dst[:1000], src[:1000])
    p50 = float(np.median(ms))
    del src, dst
    return {"bytes_per_copy": nbytes, "copy_ms_p50": p50, "bandwidth_GBps": 2 * nbytes / (p50 * 1e-3) / 1e9}


# ---- inputs -----------------------------------------------------------------------------------------------------
def texts_with_tokens(lm: LanguageModel, n_texts: int, n_tokens: int) -> list[str]:
    """AG News test articles cut or extended (with following articles) to exactly n_tokens sender tokens."""
    rows = [r.text for r in load_split(TASK, "test", limit=400)]
    out, i = [], 0
    while len(out) < n_texts:
        words: list[str] = []
        while lm.token_count(" ".join(words)) < n_tokens:
            words.extend(rows[i % len(rows)].split())
            i += 1
        while len(words) > 1 and lm.token_count(" ".join(words)) > n_tokens:
            words.pop()
        text = " ".join(words)
        while lm.token_count(text) < n_tokens:  # a dropped word took several tokens: pad with one-token words
            text += " news"
        out.append(text)
    return out


def build(args, device: torch.device):
    dtype = FastPathConfig(dtype=args.fp_dtype).torch_dtype(device)
    t0 = time.perf_counter()
    sender = LanguageModel.load(args.sender, device=str(device), dtype=dtype)
    receiver = LanguageModel.load(args.receiver, device=str(device), dtype=dtype)
    sync(device)
    load_s = time.perf_counter() - t0
    layer = min(args.layer, sender.num_layers)
    config = BridgeConfig(sender_hidden=sender.hidden_size, receiver_hidden=receiver.hidden_size, sender_layer=layer,
                          num_latents=args.num_latents, d_model=args.d_model, depth=args.depth, num_heads=args.heads,
                          d_wire=args.d_wire)
    torch.manual_seed(0)
    bridge = Bridge(config, target_rms=receiver.embedding_rms_median()).to(device=device, dtype=dtype).eval().requires_grad_(False)
    spec = get_task(TASK)
    meta = BridgeMeta(
        path=Path("<random bridge, in memory>"), config=config, spec=spec, sender=sender.fingerprint(),
        receiver=receiver.fingerprint(), weights_sha256="random-init-seed-0", training={"answer_prefix": spec.answer_prefix},
    )
    s_engine = SenderEngine(sender, BridgeSet([LoadedBridge(meta, bridge.encoder)]))
    r_engine = ReceiverEngine(receiver, BridgeSet([LoadedBridge(meta, bridge.adapter)]))
    return s_engine, r_engine, meta, load_s


def eager_bridge(s_engine: SenderEngine, r_engine: ReceiverEngine, texts: list[str], wire: str) -> torch.Tensor:
    """The eager reference: engines as they are (HF forward with masks, truncated sender, label-only logits)."""
    latents, meta = s_engine.encode(texts, TASK)
    values, scales = quantize(latents, wire)
    probs, _ = r_engine.classify_latents(dequantize(values, scales), TASK, meta.bridge_id)
    return probs


def weight_bytes(lm: LanguageModel, modules) -> int:
    seen, total = set(), 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


def floor_bytes(s_engine: SenderEngine, r_engine: ReceiverEngine, meta: BridgeMeta, n_tokens: int) -> dict:
    """Bytes of weights the batch-1 bridge path must read once: only what actually runs."""
    s, r = s_engine.lm, r_engine.lm
    L = meta.config.sender_layer
    elem_s, elem_r = s.model.get_input_embeddings().weight.element_size(), r.model.get_input_embeddings().weight.element_size()
    parts = {
        "sender_embedding_rows": n_tokens * s.hidden_size * elem_s,  # rows gathered for the input ids
        f"sender_layers_1_to_{L}": weight_bytes(s, s.backbone.layers[:L]),  # no final norm, no LM head
        "bridge_encoder": weight_bytes(s, [s_engine.bridges.by_id[meta.bridge_id].module]),
        "bridge_adapter": weight_bytes(r, [r_engine.bridges.by_id[meta.bridge_id].module]),
        f"receiver_layers_1_to_{r.num_layers}": weight_bytes(r, r.backbone.layers),
        "receiver_final_norm": weight_bytes(r, [r.backbone.norm]),
        "receiver_label_rows": len(meta.verbalizers) * r.hidden_size * elem_r,  # L rows of the LM head
        "receiver_embedding_rows": 0,  # primer / answer prefix are embedded once at start-up
    }
    return {"parts": parts, "total": sum(parts.values())}


# ---- dynamic batching ---------------------------------------------------------------------------------------------
class DynamicBatcher:
    """One worker thread: waits for a first request, gathers up to max_batch within max_delay, runs them together.

    pipelined: `fn` returns a pending answer (FastPipeline.classify_async) and the worker gathers, tokenises and
    queues batch N+1 on the device before it waits for batch N, so the device never idles on the host's work.
    """

    def __init__(self, fn, max_batch: int, max_delay_s: float, pipelined: bool = False):
        self.fn, self.max_batch, self.max_delay_s, self.pipelined = fn, max_batch, max_delay_s, pipelined
        self.q: queue.Queue = queue.Queue()
        self.batch_sizes: list[int] = []
        self._stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def submit(self, text: str) -> Future:
        fut: Future = Future()
        self.q.put((text, fut))
        return fut

    def close(self) -> None:
        self._stop = True
        self.q.put(None)
        self.thread.join(timeout=10)

    def _gather(self, first) -> list:
        batch = [first]
        deadline = time.perf_counter() + self.max_delay_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                item = self.q.get(timeout=remaining)
            except queue.Empty:
                break
            if item is None:
                self._stop = True
                break
            batch.append(item)
        return batch

    def _deliver(self, batch: list, answer) -> None:
        try:
            probs = answer.result() if self.pipelined else answer
            for (_, fut), p in zip(batch, probs):
                fut.set_result(p)
        except Exception as exc:  # noqa: BLE001 - hand the error to every waiting request
            for _, fut in batch:
                fut.set_exception(exc)
        self.batch_sizes.append(len(batch))

    def _loop(self) -> None:
        pending = None  # (batch, answer) queued on the device, not delivered yet
        while True:
            try:
                first = self.q.get(block=pending is None)
            except queue.Empty:  # nothing new: finish the batch in flight
                self._deliver(*pending)
                pending = None
                continue
            if first is None or self._stop:
                if pending is not None:
                    self._deliver(*pending)
                return
            batch = self._gather(first)
            try:
                answer = self.fn([t for t, _ in batch])
            except Exception as exc:  # noqa: BLE001
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            if pending is not None:
                self._deliver(*pending)
                pending = None
            if self.pipelined:
                pending = (batch, answer)
            else:
                self._deliver(batch, answer)


def run_batcher(fn, texts: list[str], max_batch: int, clients: int, seconds: float, max_delay_s: float = 0.002,
                pipelined: bool = False) -> dict:
    batcher = DynamicBatcher(fn, max_batch, max_delay_s, pipelined)
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = [0.0]
    start_evt = threading.Event()

    def client(i: int) -> None:
        start_evt.wait()
        k = i
        while time.perf_counter() < stop_at[0]:
            t = time.perf_counter()
            batcher.submit(texts[k % len(texts)]).result()
            with lock:
                latencies.append((time.perf_counter() - t) * 1e3)
            k += clients

    # warm-up round (graph capture of this batch bucket happens here)
    for f in [batcher.submit(texts[i % len(texts)]) for i in range(max_batch)]:
        f.result()
    batcher.batch_sizes.clear()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start_evt.set()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t0
    batcher.close()
    s = stats(latencies)
    return {"requests": len(latencies), "seconds": elapsed, "rps": len(latencies) / elapsed, "latency_ms": s,
            "mean_batch": float(np.mean(batcher.batch_sizes)) if batcher.batch_sizes else 0.0, "clients": clients,
            "max_batch": max_batch, "max_delay_ms": max_delay_s * 1e3, "pipelined": pipelined}
