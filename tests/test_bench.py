"""`telepathy bench` against a real gateway (uvicorn, loopback) and real services (tiny random pair, in-process):
the JSON report is complete and consistent, the CDF plot is a real PNG, errors are counted, not hidden."""

from __future__ import annotations

import json
import socket

import matplotlib.image
import pytest

from telepathy.bridge.models import TINY_RECEIVER, TINY_SENDER
from telepathy.cli import main
from telepathy.gateway.settings import GatewaySettings
from telepathy.receiver_service.app import build_receiver
from telepathy.receiver_service.settings import ReceiverSettings
from telepathy.sender_service.app import build_sender
from telepathy.sender_service.settings import SenderSettings
from telepathy.testing import GatewayThread, ServiceThread, make_untrained_bridges


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory, tiny_sender, tiny_receiver):
    bridges = str(make_untrained_bridges(tmp_path_factory.mktemp("bench-bridges"), tiny_sender, tiny_receiver,
                                         tasks=["sst2"], sender_layer=2))
    common = dict(bridges=bridges, port=0, max_batch_size=4, grace_s=0.5)
    receiver = ServiceThread(lambda: build_receiver(ReceiverSettings(model=TINY_RECEIVER, **common), tiny_receiver),
                             "receiver").start()
    sender = ServiceThread(lambda: build_sender(SenderSettings(
        model=TINY_SENDER, receiver_addr=receiver.address, max_relay_tokens=8, **common), tiny_sender), "sender").start()
    gw = GatewayThread(GatewaySettings(port=0, sender_addr=sender.address, receiver_addr=receiver.address)).start()
    yield gw.url
    gw.stop()
    sender.stop()
    receiver.stop()


def test_bench_writes_json_and_png(gateway_url, tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "cdf.png"
    rc = main(["bench", "--url", gateway_url, "--task", "sst2", "--requests", "12", "--concurrency", "3",
               "--warmup", "2", "--out", str(out), "--plot", str(png), "--no-progress"])
    assert rc == 0
    report = json.loads(out.read_text())

    assert report["config"]["requests"] == 12 and report["config"]["paths"] == ["bridge", "text"]
    assert report["texts"] == "data/sst2/test.jsonl" and report["texts_available"] == 1821
    assert report["server"]["sender"]["model"] == TINY_SENDER and report["server"]["receiver"]["model"] == TINY_RECEIVER
    assert report["client"]["cpu_count"] >= 1
    for path in ("bridge", "text"):
        s = report["paths"][path]
        assert (s["requests"], s["ok"], s["errors"], s["errors_by_status"]) == (12, 12, 0, {})  # warm-up excluded
        lat = s["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert lat["min"] <= lat["mean"] <= lat["max"]
        assert s["throughput_rps"] > 0 and s["wall_s"] > 0
        assert 0.0 <= s["accuracy"] <= 1.0  # the test split has labels
        assert s["wire_bytes_mean"] > 0
        assert set(s["server_timings_ms_mean"]) == {"sender", "wire", "receiver", "total"}
        assert len(report["latencies_ms"][path]) == 12
    sp = report["speedup"]
    b, t = report["paths"]["bridge"]["latency_ms"], report["paths"]["text"]["latency_ms"]
    assert sp["p50"] == pytest.approx(t["p50"] / b["p50"], rel=1e-2)
    assert sp["mean"] == pytest.approx(t["mean"] / b["mean"], rel=1e-2)

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w, _ = matplotlib.image.imread(png).shape
    assert h > 300 and w > 500

    printed = capsys.readouterr().out
    assert "bridge vs text speed-up: p50" in printed and f"wrote {out} and {png}" in printed


def test_bench_counts_errors_and_fails_when_nothing_worked(gateway_url, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("first question ?\nsecond one ?\n")  # plain lines: cycled, no labels
    out = tmp_path / "errors.json"
    rc = main(["bench", "--url", gateway_url, "--task", "trec", "--requests", "4", "--paths", "bridge", "--warmup", "0",
               "--texts", str(texts), "--out", str(out), "--no-progress"])
    assert rc == 1  # a benchmark in which every request failed must not look like a success
    report = json.loads(out.read_text())
    s = report["paths"]["bridge"]
    assert (s["ok"], s["errors"], s["errors_by_status"]) == (0, 4, {"404": 4})
    assert "no bridge is loaded for task 'trec'" in s["first_error"]
    assert s["latency_ms"]["p50"] is None and s["accuracy"] is None
    assert report["speedup"] is None and report["texts"] == str(texts)


def test_bench_refuses_a_gateway_that_is_not_ready(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # No gateway at all on that port: a clear message and exit 1, no report.
    rc = main(["bench", "--url", f"http://127.0.0.1:{port}", "--requests", "2", "--out", str(tmp_path / "x.json"),
               "--no-progress"])
    assert rc == 1 and not (tmp_path / "x.json").exists()
    assert "bench:" in capsys.readouterr().err
