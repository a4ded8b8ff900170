"""Benchmark the sender and receiver services: per-stage latency (p50/p99) and wire bytes, per wire dtype.

Starts both services in this process on loopback (telepathy.testing.ServiceThread) — or, with --processes, as two
`telepathy serve` processes like a deployment (no GIL shared with each other or with the client); with --pair,
one `telepathy serve pair` (both models in one service, the bridge path fused into one model call) — then for each
wire dtype sends
`-n` relays one at a time (batch-1 latency, from the services' own timings_us) and `-n` more from
`--concurrency` client threads (throughput, and what batching does to latency); then the text path.

    python tools/bench_services.py                                      # tiny random pair, untrained bridges
    python tools/bench_services.py --sender smollm2-135m-instruct --receiver gemma-3-270m --device cuda
    python tools/bench_services.py --bridges runs/bridges --out results/bench_services.json
    # the services figure of docs/PERFORMANCE.md, after tools/gpu_latency.py in the same call (same bridge shape, 64-token inputs):
    python tools/bench_services.py --sender random:llama-3.1-8b --receiver random:mistral-7b-v0.3 --device cuda \
        --sender-layer 28 --input-tokens 64 --dtypes int8 --gpu-latency-json results/gpu_latency.json
    # two GPUs of one host: --sender-device cuda:0 --receiver-device cuda:1
    # sender and receiver in one process (telepathy serve pair); with --processes as its own process:
    python tools/bench_services.py --pair --processes ...

Without --bridges, untrained bridges are made for the pair (the default bridge shape for real models, a tiny
one for random:tiny-*): the numbers are about speed and bytes, not accuracy. Not a test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch
from google.protobuf import __version__ as protobuf_version

from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.models import TINY_RECEIVER, TINY_SENDER
from telepathy.bridge.tasks import BUILTIN_TASKS
from telepathy.pair_service.app import build_pair
from telepathy.pair_service.settings import PairSettings
from telepathy.protos.v1 import common_pb2, sender_pb2, sender_pb2_grpc
from telepathy.receiver_service.app import build_receiver
from telepathy.receiver_service.settings import ReceiverSettings
from telepathy.sender_service.app import build_sender
from telepathy.sender_service.settings import SenderSettings
from telepathy.serving.channels import make_sync_channel
from telepathy.serving.lifecycle import resolve_device
from telepathy.testing import ServiceThread, free_port, make_untrained_bridges, wait_until_serving

STAGES = ["sender_queue", "sender_model", "wire", "receiver_queue", "receiver_model", "total"]
DTYPES = {"fp32": common_pb2.DTYPE_FP32, "fp16": common_pb2.DTYPE_FP16, "bf16": common_pb2.DTYPE_BF16,
          "int8": common_pb2.DTYPE_INT8}
TEXTS = [
    "The Lakers beat the Celtics 101-99 in overtime on Sunday night.",
    "Oil prices fell for a third day as traders weighed weaker demand in Asia.",
    "What is the capital of Australia ?",
    "A gripping, beautifully acted film that never lets go.",
    "NASA's new probe sent back its first images of the far side of the moon.",
    "How many feet are in a mile ?",
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summarize(responses: list[sender_pb2.RelayResponse], client_s: list[float]) -> dict:
    stages = {s: [r.result.timings_us[s] / 1000 for r in responses] for s in STAGES}
    # What the services add per request: the client's round trip minus the two model stages of that request.
    added = [c * 1000 - sm - rm for c, sm, rm in zip(client_s, stages["sender_model"], stages["receiver_model"])]
    return {
        "added_over_model_ms": {"p50": percentile(added, 50), "p99": percentile(added, 99)},
        "requests": len(responses),
        "wire_bytes": statistics.mean(r.wire_bytes for r in responses),
        "ms": {s: {"p50": percentile(v, 50), "p99": percentile(v, 99)} for s, v in stages.items()},
        "client_ms": {"p50": percentile([c * 1000 for c in client_s], 50), "p99": percentile([c * 1000 for c in client_s], 99)},
    }


def run(stub, requests: list[sender_pb2.RelayRequest], concurrency: int) -> dict:
    def one(req):
        started = time.perf_counter()
        resp = stub.Relay(req, timeout=120)
        return resp, time.perf_counter() - started

    started = time.perf_counter()
    if concurrency <= 1:
        out = [one(r) for r in requests]
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            out = list(pool.map(one, requests))
    wall = time.perf_counter() - started
    summary = summarize([r for r, _ in out], [c for _, c in out])
    summary.update(concurrency=concurrency, throughput_rps=len(requests) / wall)
    return summary


def bridge_shape(sender: LanguageModel, receiver: LanguageModel, sender_layer: int | None = None) -> dict:
    """The bridge of tools/gpu_latency.py for real shapes (K=16, d_model 512, depth 2, d_wire 512), a tiny one else."""
    if sender.spec.startswith("random:tiny") or receiver.spec.startswith("random:tiny"):
        return {"sender_layer": sender_layer or max(1, sender.num_layers // 2)}
    return {"sender_layer": sender_layer or max(1, sender.num_layers * 4 // 5), "num_latents": 16, "d_model": 512,
            "depth": 2, "num_heads": 8, "d_wire": 512}


def bench_texts(sender: LanguageModel, n: int, input_tokens: int | None) -> list[str]:
    """The short mixed TEXTS, or AG News articles cut to exactly `input_tokens` sender tokens (gpu_latency's inputs)."""
    if not input_tokens:
        return [TEXTS[i % len(TEXTS)] for i in range(n)]
    from bench_support import texts_with_tokens  # tools/bench_support.py, a sibling of this script

    return texts_with_tokens(sender, n, input_tokens)


def update_gpu_latency(path: Path, results: dict, meta: dict) -> None:
    """Fill services_b1_ms_p50 / _p99 of tools/gpu_latency.py's JSON with the int8 batch-1 round trip."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    b1 = results["bridge/int8"][0]
    model = doc.get("bridge_b1_ms_p50")
    doc["services_b1_ms_p50"], doc["services_b1_ms_p99"] = b1["client_ms"]["p50"], b1["client_ms"]["p99"]
    doc.setdefault("services", {})[meta["placement"]] = {
        "client_ms": b1["client_ms"], "added_over_own_model_stages_ms": b1["added_over_model_ms"],
        "stages_ms": b1["ms"], "requests": b1["requests"], "meta": meta,
        "added_over_bench_model_p50_ms": None if model is None else b1["client_ms"]["p50"] - model,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"updated {path}: services {meta['placement']} p50 {b1['client_ms']['p50']:.2f} ms "
          f"(bench model p50 {model if model is None else round(model, 2)} ms)")


class ServiceProcess:
    """`python -m telepathy.cli serve ROLE …` in its own process (stdout/stderr to LOG); stop() sends SIGTERM (drain)."""

    def __init__(self, role: str, options: dict, log_path: Path):
        self.address = f"127.0.0.1:{options['port']}"
        argv = [sys.executable, "-m", "telepathy.cli", "serve", role]
        for key, value in options.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        self.log = open(log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=os.environ.copy())

    def wait(self, timeout: float) -> ServiceProcess:
        wait_until_serving(self.address, timeout=timeout, alive=lambda: self.proc.poll() is None)
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def print_table(results: dict) -> None:
    header = f"{'path':<14}{'conc':>5}{'bytes':>8}" + "".join(f"{s:>20}" for s in STAGES) + f"{'client':>16}{'req/s':>9}"
    print(header)
    print(" " * 27 + "".join(f"{'p50 / p99 ms':>20}" for _ in STAGES) + f"{'p50 / p99 ms':>16}")
    print("-" * len(header))
    for name, runs in results.items():
        for r in runs:
            cells = "".join(f"{r['ms'][s]['p50']:>10.2f} /{r['ms'][s]['p99']:>7.2f}" for s in STAGES)
            print(f"{name:<14}{r['concurrency']:>5}{r['wire_bytes']:>8.0f}{cells}"
                  f"{r['client_ms']['p50']:>8.2f} /{r['client_ms']['p99']:>6.2f}{r['throughput_rps']:>9.1f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sender", default=TINY_SENDER, help="sender model spec")
    p.add_argument("--receiver", default=TINY_RECEIVER, help="receiver model spec")
    p.add_argument("--bridges", help="bridge folder (default: untrained bridges made for the pair)")
    p.add_argument("--task", default=next(iter(BUILTIN_TASKS)), help="a built-in task (default: the first)")
    p.add_argument("--device", default="auto")
    p.add_argument("--sender-device", default=None, help="sender's device (default --device), e.g. cuda:0")
    p.add_argument("--receiver-device", default=None, help="receiver's device (default --device), e.g. cuda:1")
    p.add_argument("--sender-layer", type=int, default=None, help="bridge layer (default 4/5 of the sender's layers)")
    p.add_argument("--input-tokens", type=int, default=None,
                   help="AG News articles cut to this many sender tokens (default: the short mixed texts)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="wire dtypes to measure")
    p.add_argument("--gpu-latency-json", type=Path, help="fill services_b1_ms_p50 in this tools/gpu_latency.py JSON")
    p.add_argument("--processes", action="store_true", help="run each service in its own process (as deployed)")
    p.add_argument("--pair", action="store_true", help="one pair service (telepathy serve pair) instead of two services")
    p.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()), help="--processes: folder for their logs")
    p.add_argument("--startup-timeout-s", type=float, default=900.0)
    p.add_argument("-n", type=int, default=100, help="relays per dtype and mode")
    p.add_argument("--concurrency", type=int, default=16, help="client threads for the throughput run (0 = skip)")
    p.add_argument("--text-n", type=int, default=10, help="text-path relays (0 = skip)")
    p.add_argument("--relay-tokens", type=int, default=16, help="tokens the sender generates on the text path")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()

    device = resolve_device(args.device)
    s_dev, r_dev = args.sender_device or device, args.receiver_device or device
    sender_lm, receiver_lm = LanguageModel.load(args.sender, device=s_dev), LanguageModel.load(args.receiver, device=r_dev)
    tmp = tempfile.TemporaryDirectory()
    bridges = args.bridges or str(make_untrained_bridges(tmp.name, sender_lm, receiver_lm, tasks=[args.task],
                                                         **bridge_shape(sender_lm, receiver_lm, args.sender_layer)))
    common = dict(bridges=bridges, max_batch_size=args.max_batch_size, max_queue_delay_ms=args.max_queue_delay_ms)
    texts = bench_texts(sender_lm, args.n, args.input_tokens)
    receiver = None
    if args.processes:  # the services load their own copies; free this process's before they start
        del sender_lm, receiver_lm
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        args.logs.mkdir(parents=True, exist_ok=True)
    if args.pair and args.processes:
        sender = ServiceProcess("pair", dict(model=args.sender, device=s_dev, receiver_model=args.receiver,
                                             receiver_device=r_dev, port=free_port(), max_relay_tokens=max(args.relay_tokens, 1),
                                             **common), args.logs / "bench_pair.log").wait(args.startup_timeout_s)
    elif args.pair:
        pair_settings = PairSettings(model=args.sender, receiver_model=args.receiver, device=s_dev, receiver_device=r_dev,
                                     port=0, max_relay_tokens=max(args.relay_tokens, 1), **common)
        sender = ServiceThread(lambda: build_pair(pair_settings, sender_lm, receiver_lm), "pair").start()
    elif args.processes:
        receiver = ServiceProcess("receiver", dict(model=args.receiver, device=r_dev, port=free_port(), **common),
                                  args.logs / "bench_receiver.log").wait(args.startup_timeout_s)
        sender = ServiceProcess("sender", dict(model=args.sender, device=s_dev, port=free_port(),
                                               receiver_addr=receiver.address, max_relay_tokens=max(args.relay_tokens, 1),
                                               **common), args.logs / "bench_sender.log")
        try:
            sender.wait(args.startup_timeout_s)
        except Exception:
            receiver.stop()
            sender.stop()
            raise
    else:
        receiver_settings = ReceiverSettings(model=args.receiver, device=r_dev, port=0, **common)
        receiver = ServiceThread(lambda: build_receiver(receiver_settings, receiver_lm), "receiver").start()
        sender_settings = SenderSettings(model=args.sender, receiver_addr=receiver.address, device=s_dev, port=0,
                                         max_relay_tokens=max(args.relay_tokens, 1), **common)
        sender = ServiceThread(lambda: build_sender(sender_settings, sender_lm), "sender").start()
    results: dict[str, list[dict]] = {}
    try:
        stub = sender_pb2_grpc.SenderStub(make_sync_channel(sender.address))
        for name, dtype in DTYPES.items():
            if name not in args.dtypes.split(","):
                continue
            reqs = [sender_pb2.RelayRequest(task=args.task, text=t, wire_dtype=dtype) for t in texts]
            run(stub, reqs[:5], 1)  # settle: connection, allocator
            results[f"bridge/{name}"] = [run(stub, reqs, 1)]
            if args.concurrency:
                results[f"bridge/{name}"].append(run(stub, reqs, args.concurrency))
        if args.text_n:
            reqs = [sender_pb2.RelayRequest(task=args.task, text=TEXTS[i % len(TEXTS)], path=sender_pb2.PATH_TEXT,
                                            max_relay_tokens=args.relay_tokens) for i in range(args.text_n)]
            results["text"] = [run(stub, reqs, 1)]
    finally:
        sender.stop()
        if receiver is not None:
            receiver.stop()
        tmp.cleanup()

    placement = ("one device" if s_dev == r_dev else "two devices") + (
        ", pair service" + (" (own process)" if args.processes else " (in the bench process)") if args.pair
        else ", two processes" if args.processes else ", one process")
    print(f"sender {args.sender} on {s_dev} → receiver {args.receiver} on {r_dev}; task {args.task}; "
          f"max batch {args.max_batch_size}, max queue delay {args.max_queue_delay_ms} ms")
    print_table(results)
    for name, runs in results.items():
        r = runs[0]
        print(f"{name}: services add p50 {r['added_over_model_ms']['p50']:.2f} / p99 {r['added_over_model_ms']['p99']:.2f} ms "
              f"over the request's own model stages (batch 1)")
    meta = {"sender": args.sender, "receiver": args.receiver, "device": device, "sender_device": s_dev,
            "receiver_device": r_dev, "placement": placement, "gpu": [torch.cuda.get_device_name(d) for d in
                                                                       sorted({s_dev, r_dev})] if device.startswith("cuda") else None,
            "input_tokens": args.input_tokens, "sender_layer": args.sender_layer, "grpc": grpc.__version__,
            "processes": args.processes, "pair": args.pair, "max_queue_delay_ms": args.max_queue_delay_ms,
            "protobuf": protobuf_version}
    if args.gpu_latency_json and "bridge/int8" in results:
        update_gpu_latency(args.gpu_latency_json, results, meta)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta |= {"task": args.task,
                "bridges": args.bridges or "untrained", "max_batch_size": args.max_batch_size,
                "max_queue_delay_ms": args.max_queue_delay_ms, "relay_tokens": args.relay_tokens,
                "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "threads": torch.get_num_threads()}
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
