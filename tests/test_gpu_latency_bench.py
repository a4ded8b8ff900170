"""tools/gpu_latency.py on the CPU with the tiny pair: its batchers (tools/bench_support.py) answer what an unbatched
call answers, and a whole (short) run writes the headline JSON fields. The GPU figures themselves come from the device
(PERFORMANCE.md)."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from telepathy.bridge.runtime.fastpath import FastPathConfig, FastPipeline, ReceiverFastPath, SenderFastPath
from tests.test_fastpath import TASK, engines, texts_of  # noqa: F401  (fixture)

TOOLS = Path(__file__).resolve().parent.parent / "tools"
REQUIRED = ["device", "bridge_b1_ms_p50", "bridge_b1_ms_p99", "floor_ms", "text_relay_48_ms_p50", "throughput_b32_rps",
            "services_b1_ms_p50"]


@pytest.fixture
def tools_on_path(monkeypatch) -> Path:
    """tools/ first on sys.path, as `python tools/gpu_latency.py` has it, so the scripts' sibling imports resolve."""
    monkeypatch.syspath_prepend(str(TOOLS))
    return TOOLS


@pytest.fixture
def bench_support(tools_on_path) -> ModuleType:
    return importlib.import_module("bench_support")


@pytest.fixture
def gpu_latency(tools_on_path) -> ModuleType:
    """The script, loaded from its file (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_latency", tools_on_path / "gpu_latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
def test_batcher_answers_each_request_with_its_own_row(engines, pipelined, bench_support):  # noqa: F811
    DynamicBatcher, run_batcher = bench_support.DynamicBatcher, bench_support.run_batcher
    sender, receiver = engines
    pipe = FastPipeline(SenderFastPath(sender, FastPathConfig()), ReceiverFastPath(receiver, FastPathConfig()))
    texts = texts_of([3 + (i * 5) % 30 for i in range(13)])
    alone = [pipe.classify_batch([t], TASK)[0] for t in texts]
    fn = (lambda b: pipe.classify_async(b, TASK)) if pipelined else (lambda b: pipe.classify_batch(b, TASK))
    batcher = DynamicBatcher(fn, max_batch=4, max_delay_s=0.05, pipelined=pipelined)
    try:
        got = [f.result(timeout=60) for f in [batcher.submit(t) for t in texts]]
    finally:
        batcher.close()
    for g, a in zip(got, alone):
        torch.testing.assert_close(g, a, rtol=1e-4, atol=1e-5)
    assert sum(batcher.batch_sizes) == len(texts) and max(batcher.batch_sizes) == 4
    stats = run_batcher(fn, texts, max_batch=4, clients=8, seconds=0.3, pipelined=pipelined)
    assert stats["requests"] > 0 and stats["pipelined"] is pipelined and 1 <= stats["mean_batch"] <= 4


def test_tiny_cpu_run_writes_the_headline_fields(tmp_path, capsys, gpu_latency):
    out = tmp_path / "gpu_latency.json"
    code = gpu_latency.main(["--tiny", "--device", "cpu", "--runs", "3", "--warmup", "1", "--ablation-runs", "1",
                             "--relay-runs", "1", "--relay-eager-runs", "1", "--relay-tokens", "4,48", "--batches", "1,32",
                             "--throughput-seconds", "0.2", "--parity-rows", "4", "--skip", "ablations", "--out", str(out)])
    assert code == 0, capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["errors"] == {}
    assert all(k in doc for k in REQUIRED) and doc["services_b1_ms_p50"] is None  # the services bench fills it
    assert doc["bridge_b1_ms_p50"] > 0 and doc["floor_ms"] > 0 and doc["text_relay_48_ms_p50"] > 0
    row = doc["throughput"]["32"]
    assert doc["throughput_b32_rps"] == row["saturated_pipelined"]["rps"] and row["saturated_pipelined"]["clients"] == 64
    assert row["dynamic_batching"]["clients"] == 32
    assert doc["parity"]["ok"] is True
