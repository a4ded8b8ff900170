"""Round trips through real sender and receiver services on loopback (in-process, tiny random pair)."""

from __future__ import annotations

import io
import runpy
import sys
from contextlib import redirect_stdout

import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from telepathy.bridge.codec import decode_batch
from telepathy.bridge.runtime.engine import ReceiverEngine, SenderEngine, load_bridge_set
from telepathy.client import ReceiverClient, SenderClient
from telepathy.protos.v1 import common_pb2, receiver_pb2, sender_pb2
from telepathy.serving.channels import make_sync_channel
from tests.services_support import (
    ROOT,
    TIMEOUT,
    free_port,
    metric,
    receiver_stub,
    relay,
    scrape,
    sender_stub,
    start_receiver,
    start_sender,
)

TIMING_KEYS = {"sender_queue", "sender_model", "wire", "receiver_queue", "receiver_model", "total"}
DTYPES = {"fp32": common_pb2.DTYPE_FP32, "fp16": common_pb2.DTYPE_FP16, "bf16": common_pb2.DTYPE_BF16, "int8": common_pb2.DTYPE_INT8}
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


@pytest.fixture(scope="module")
def pair(tiny_bridges_dir):
    ports = free_port(), free_port()
    receiver = start_receiver(tiny_bridges_dir, metrics_port=ports[0])
    sender = start_sender(tiny_bridges_dir, receiver.address, metrics_port=ports[1])
    yield sender, receiver, ports
    sender.stop()
    receiver.stop()


@pytest.fixture(scope="module")
def reference(tiny_sender, tiny_receiver, tiny_bridges_dir):
    """The same computation in-process, without any service: what every answer must equal."""
    sender = SenderEngine(tiny_sender, load_bridge_set(tiny_bridges_dir, tiny_sender, "sender", "cpu"))
    receiver = ReceiverEngine(tiny_receiver, load_bridge_set(tiny_bridges_dir, tiny_receiver, "receiver", "cpu"))

    def probabilities(text: str, task: str, dtype: str = "int8") -> list[float]:
        wire, _ = sender.encode_wire([text], task, dtype)
        return receiver.classify_latents(decode_batch(wire), task)[0][0].tolist()

    probabilities.sender, probabilities.receiver = sender, receiver
    return probabilities


def _probs(result) -> list[float]:
    return [s.probability for s in result.scores]


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_bridge_path_round_trip_matches_in_process_engines(pair, reference, dtype):
    sender, _, _ = pair
    text = "the home team won the cup final"
    resp = sender_stub(sender.address).Relay(relay("ag_news", text, wire_dtype=DTYPES[dtype], request_id="r-1"), timeout=TIMEOUT)
    assert resp.path == sender_pb2.PATH_BRIDGE
    assert resp.result.request_id == "r-1" and resp.result.task == "ag_news"
    assert resp.result.bridge_id.startswith("ag_news-")
    assert [s.label for s in resp.result.scores] == ["World", "Sports", "Business", "Sci/Tech"]
    torch.testing.assert_close(_probs(resp.result), reference(text, "ag_news", dtype), atol=1e-4, rtol=0)
    assert resp.result.label_index == max(range(4), key=lambda i: _probs(resp.result)[i])
    assert resp.wire_bytes == 4 * 16 * BYTES[dtype] + (4 * 4 if dtype == "int8" else 0)  # K=4, d_wire=16 (+ scales)
    assert set(resp.result.timings_us) == TIMING_KEYS
    t = resp.result.timings_us
    assert t["total"] >= t["sender_model"] + t["receiver_model"] > 0


def test_text_path_round_trip(pair, reference):
    sender, _, _ = pair
    stub = sender_stub(sender.address)
    text = "what is the capital of france ?"
    resp = stub.Relay(relay("trec", text, path=sender_pb2.PATH_TEXT, max_relay_tokens=6), timeout=TIMEOUT)
    assert resp.path == sender_pb2.PATH_TEXT and resp.result.bridge_id == ""
    assert resp.wire_bytes == len(resp.relay_text.encode("utf-8"))
    assert set(resp.result.timings_us) == TIMING_KEYS
    assert stub.Generate(sender_pb2.GenerateRequest(task="trec", text=text, max_tokens=6), timeout=TIMEOUT).text == resp.relay_text
    expected = reference.receiver.classify_text([resp.relay_text], "trec")[0].tolist()
    torch.testing.assert_close(_probs(resp.result), expected, atol=1e-4, rtol=0)


def test_fifty_concurrent_requests_are_multiplexed_on_one_stream(pair, reference):
    sender, receiver, _ = pair
    stub = sender_stub(sender.address)
    tasks = ["ag_news", "trec", "sst2"]
    texts = [f"request {i} about " + " ".join(["the match", "stocks", "a film", "france"][: 1 + i % 4]) for i in range(50)]
    before = receiver.service.metrics.render().decode()
    reconnects = sender.service.metrics.reconnects._value.get()
    futures = [stub.Relay.future(relay(tasks[i % 3], texts[i], request_id=f"id-{i}"), timeout=TIMEOUT) for i in range(50)]
    results = [f.result() for f in futures]
    for i, resp in enumerate(results):  # each answer belongs to its own request, and is that request's answer
        assert resp.result.request_id == f"id-{i}" and resp.result.task == tasks[i % 3]
        torch.testing.assert_close(_probs(resp.result), reference(texts[i], tasks[i % 3]), atol=1e-3, rtol=0)
    after = receiver.service.metrics.render().decode()
    items = metric(after, "telepathy_requests_total", method="ClassifyStream.item", code="OK") - \
        metric(before, "telepathy_requests_total", method="ClassifyStream.item", code="OK")
    assert items == 50
    assert sender.service.metrics.reconnects._value.get() == reconnects  # the same stream all along


def test_agent_clients_encode_then_classify(pair, tiny_bridges_dir):
    sender, receiver, _ = pair
    text = "a gripping , beautifully acted film"
    with SenderClient(sender.address) as s, ReceiverClient(receiver.address) as r:
        soft = s.encode(text, task="sst2", wire_dtype="fp16")
        assert soft.shape == (4, 16) and soft.nbytes == 4 * 16 * 2
        assert soft.fingerprint == r.fingerprint("sst2")
        direct = r.classify(soft)
        relayed = s.relay(text, task="sst2", wire_dtype="fp16")
        assert direct.label == relayed.label
        assert direct.scores == pytest.approx(relayed.scores, abs=1e-5)
        assert set(direct.timings_us) == {"receiver_queue", "receiver_model", "total"}
        text_result = r.classify_text("great film", task="sst2")
        assert set(text_result.scores) == {"negative", "positive"}


def test_agent_with_its_own_encoder(pair, reference):
    _, receiver, _ = pair
    latents, meta = reference.sender.encode(["stocks fell on monday"], "ag_news")  # [1, K, d_wire]
    with ReceiverClient(receiver.address) as r:
        result = r.classify_latents(latents[0], task="ag_news", fingerprint=meta.fingerprint, wire_dtype="fp32")
    expected = reference.receiver.classify_latents(latents, "ag_news")[0][0].tolist()
    assert list(result.scores.values()) == pytest.approx(expected, abs=1e-5)


def test_info_list_bridges_and_limits(pair, tiny_sender, tiny_receiver):
    sender, receiver, _ = pair
    info = sender_stub(sender.address).Info(sender_pb2.SenderInfoRequest(), timeout=TIMEOUT)
    assert info.model.digest == tiny_sender.fingerprint().digest and info.receiver_connected
    assert info.receiver_address == receiver.address
    assert sorted(b.task for b in info.bridges) == ["ag_news", "sst2", "trec"]
    assert (info.limits.max_batch_size, info.limits.max_queue_size, info.limits.max_text_chars) == (32, 256, 4000)
    assert (info.limits.max_message_bytes, info.limits.max_relay_tokens, info.limits.max_queue_delay_ms) == (4 << 20, 48, 2.0)
    rinfo = receiver_stub(receiver.address).Info(receiver_pb2.ReceiverInfoRequest(), timeout=TIMEOUT)
    assert rinfo.model.digest == tiny_receiver.fingerprint().digest
    assert list(rinfo.tasks) == ["ag_news", "sst2", "trec"] and list(rinfo.wire_dtypes) == ["fp32", "fp16", "bf16", "int8"]
    bridges = receiver_stub(receiver.address).ListBridges(receiver_pb2.ListBridgesRequest(), timeout=TIMEOUT).bridges
    assert {b.fingerprint for b in bridges} == {b.fingerprint for b in info.bridges}


def test_health_and_reflection(pair):
    for service, name in ((pair[0], "telepathy.v1.Sender"), (pair[1], "telepathy.v1.Receiver")):
        channel = make_sync_channel(service.address)
        health = health_pb2_grpc.HealthStub(channel)
        for svc in ("", name):
            status = health.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in reply.list_services_response.service}
        assert {name, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_prometheus_metrics_are_served(pair):
    sender_stub(pair[0].address).Relay(relay(), timeout=TIMEOUT)
    receiver_port, sender_port = pair[2]
    s, r = scrape(sender_port), scrape(receiver_port)
    assert metric(s, "telepathy_requests_total", method="Relay", code="OK") >= 1
    assert metric(s, "telepathy_stage_seconds_count", stage="wire") >= 1
    assert metric(s, "telepathy_batch_size_count", batcher="sender_encode") >= 1
    assert metric(s, "telepathy_receiver_connected") == 1
    assert "telepathy_queue_depth" in s and "telepathy_wire_bytes_bucket" in s
    assert metric(r, "telepathy_stage_seconds_count", stage="receiver_model") >= 1
    assert metric(r, "telepathy_batch_size_count", batcher="receiver_soft_tokens") >= 1
    assert metric(r, "telepathy_service_info", service="receiver", model="random:tiny-gemma") == 1


def test_agents_exchange_example_runs(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["agents_exchange.py"])
    out = io.StringIO()
    with redirect_stdout(out):
        runpy.run_path(str(ROOT / "examples" / "agents_exchange.py"), run_name="__main__")
    text = out.getvalue()
    assert "alice: encoded" in text and "bob:" in text and "carol:" in text
    assert "same message, same bridge → same reading: True" in text
