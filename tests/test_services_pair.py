"""The pair service (sender and receiver in one process, one port): the fused bridge path answers what two
separate services answer, the text path and the Receiver API still work, bad input gets the same errors."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from telepathy.protos.v1 import common_pb2, receiver_pb2, sender_pb2
from telepathy.serving.channels import make_sync_channel
from tests.services_support import (
    TIMEOUT,
    assert_status,
    field_trailer,
    metric,
    receiver_stub,
    relay,
    rpc_error,
    sender_stub,
    start_pair,
)
from tests.test_services_roundtrip import reference  # noqa: F401  (fixture: the in-process engines)

C = grpc.StatusCode
DTYPES = {"fp32": common_pb2.DTYPE_FP32, "fp16": common_pb2.DTYPE_FP16, "bf16": common_pb2.DTYPE_BF16, "int8": common_pb2.DTYPE_INT8}
TEXTS = ("a fine film", "the team won the final after a long season of many games")


@pytest.fixture(scope="module", params=["off", "on"], ids=["eager", "fast-path"])
def pair_service(request, tiny_bridges_dir):
    service = start_pair(tiny_bridges_dir, fast_path=request.param, max_relay_tokens=8)
    yield service
    service.stop()


def _probs(result) -> list[float]:
    return [s.probability for s in result.scores]


@pytest.mark.parametrize("task", ["sst2", "ag_news", "trec"])
def test_fused_relay_matches_two_services(pair_service, reference, task):
    work = pair_service.service.pair_work
    assert (work.pipeline is not None) == (pair_service.service.settings.fast_path == "on")
    assert set(work.fused_tasks) == {"sst2", "ag_news", "trec"}
    stub = sender_stub(pair_service.address)
    for text in TEXTS:
        got = stub.Relay(relay(task=task, text=text), timeout=TIMEOUT)
        assert _probs(got.result) == pytest.approx(reference(text, task), abs=1e-5)
        assert got.result.label == got.result.scores[got.result.label_index].label
        t = got.result.timings_us
        assert (t["wire"], t["receiver_queue"], t["receiver_model"]) == (0, 0, 0)  # one model call, no hop
        assert 0 < t["sender_model"] <= t["total"]
        assert got.result.bridge_id == reference.sender.bridges.by_task[task].meta.bridge_id


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_fused_relay_every_wire_dtype(pair_service, reference, dtype):
    got = sender_stub(pair_service.address).Relay(relay(task="ag_news", text=TEXTS[1], wire_dtype=DTYPES[dtype]),
                                                 timeout=TIMEOUT)
    assert _probs(got.result) == pytest.approx(reference(TEXTS[1], "ag_news", dtype), abs=1e-5)
    meta = reference.sender.bridges.by_task["ag_news"].meta
    elem = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}[dtype]
    K, D = meta.config.num_latents, meta.config.d_wire
    assert got.wire_bytes == K * D * elem + (4 * K if dtype == "int8" else 0)  # what the stream would carry


def test_batched_fused_relays_match_one_at_a_time(pair_service, reference):
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"story number {i} about the market and the match" for i in range(12)]
    stub = sender_stub(pair_service.address)
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda t: stub.Relay(relay(task="trec", text=t), timeout=TIMEOUT), texts))
    for text, answer in zip(texts, got):
        assert _probs(answer.result) == pytest.approx(reference(text, "trec"), abs=1e-5)


def test_text_path_goes_to_the_receiver_in_process(pair_service):
    got = sender_stub(pair_service.address).Relay(relay(task="sst2", text="a fine film", path=sender_pb2.PATH_TEXT),
                                                 timeout=TIMEOUT)
    assert got.path == sender_pb2.PATH_TEXT and got.wire_bytes == len(got.relay_text.encode())
    same = receiver_stub(pair_service.address).ClassifyText(
        receiver_pb2.ClassifyTextRequest(task="sst2", text=got.relay_text), timeout=TIMEOUT)
    assert _probs(got.result) == pytest.approx(_probs(same.result), abs=1e-6)
    assert got.result.timings_us["receiver_model"] > 0


def test_the_pair_also_serves_the_receiver_api(pair_service, reference):
    """Another sender (here: a client with the pair's own Encode output) can use the receiver part on the same port."""
    stub, rstub = sender_stub(pair_service.address), receiver_stub(pair_service.address)
    soft = stub.Encode(sender_pb2.EncodeRequest(task="ag_news", text=TEXTS[0]), timeout=TIMEOUT).soft_tokens
    unary = rstub.Classify(receiver_pb2.ClassifyRequest(soft_tokens=soft), timeout=TIMEOUT)
    fused = stub.Relay(relay(task="ag_news", text=TEXTS[0]), timeout=TIMEOUT)
    assert _probs(unary.result) == pytest.approx(_probs(fused.result), abs=1e-5)
    streamed = list(rstub.ClassifyStream(iter([receiver_pb2.ClassifyStreamRequest(soft_tokens=soft)]), timeout=TIMEOUT))
    assert _probs(streamed[0].result) == pytest.approx(_probs(unary.result), abs=1e-6)
    assert {b.task for b in rstub.ListBridges(receiver_pb2.ListBridgesRequest(), timeout=TIMEOUT).bridges} == {"sst2", "ag_news", "trec"}
    health = health_pb2_grpc.HealthStub(make_sync_channel(pair_service.address))
    for name in ("", "telepathy.v1.Sender", "telepathy.v1.Receiver"):
        status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT).status
        assert status == health_pb2.HealthCheckResponse.SERVING, name
    info = stub.Info(sender_pb2.SenderInfoRequest(), timeout=TIMEOUT)
    assert (info.receiver_address, info.receiver_connected) == ("in-process", True)
    metrics = pair_service.service.metrics.render().decode()
    assert metric(metrics, "telepathy_receiver_connected") == 1
    assert metric(metrics, "telepathy_batch_size_count", batcher="pair_relay") >= 1  # the fused batcher ran
    assert metric(metrics, "telepathy_service_info", service="pair") == 1


BAD = {
    "empty text": (relay(text="  "), C.INVALID_ARGUMENT, "text: must not be empty", "text"),
    "missing task": (relay(task=""), C.INVALID_ARGUMENT, "task: is required", "task"),
    "unknown task": (relay(task="nope"), C.NOT_FOUND, "task: unknown task 'nope'; known tasks: ag_news, sst2, trec", "task"),
    "unknown wire dtype": (relay(wire_dtype=9), C.INVALID_ARGUMENT,
                           "wire_dtype: unknown dtype enum value 9; expected one of DTYPE_FP32, DTYPE_FP16, DTYPE_BF16, DTYPE_INT8",
                           "wire_dtype"),
    "relay tokens over the limit": (relay(path=sender_pb2.PATH_TEXT, max_relay_tokens=9), C.INVALID_ARGUMENT,
                                    "max_relay_tokens: must be between 0 and 8 (0 = 8), got 9", "max_relay_tokens"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_relays_get_the_two_service_errors(pair_service, reference, case):
    request_, code, message, field = BAD[case]
    err = rpc_error(sender_stub(pair_service.address).Relay, request_, timeout=TIMEOUT)
    assert_status(err, code, message, exact=True)
    assert field_trailer(err) == field
    got = sender_stub(pair_service.address).Relay(relay(task="sst2", text=TEXTS[0]), timeout=TIMEOUT)  # still fine
    assert _probs(got.result) == pytest.approx(reference(TEXTS[0], "sst2"), abs=1e-5)


def test_fusion_off_runs_two_model_calls_with_the_same_answer(tiny_bridges_dir, reference):
    service = start_pair(tiny_bridges_dir, fuse_bridge=False)
    try:
        got = sender_stub(service.address).Relay(relay(task="ag_news", text=TEXTS[1]), timeout=TIMEOUT)
        assert _probs(got.result) == pytest.approx(reference(TEXTS[1], "ag_news"), abs=1e-5)
        t = got.result.timings_us
        assert t["sender_model"] > 0 and t["receiver_model"] > 0  # the sender's call, then the receiver's
    finally:
        service.stop()


def test_a_task_only_the_sender_has_goes_the_two_service_way(tmp_path, tiny_sender):
    """A bridge made for another receiver model: the receiver part skips it, the pair does not fuse that task,
    and the receiver part answers as a separate receiver would."""
    from telepathy.testing import make_untrained_bridges

    bridges = make_untrained_bridges(tmp_path / "b", tiny_sender, tiny_sender, tasks=["sst2"], sender_layer=2)
    service = start_pair(bridges)
    try:
        assert service.service.pair_work.fused_tasks == set()
        err = rpc_error(sender_stub(service.address).Relay, relay("sst2"), timeout=TIMEOUT)
        assert_status(err, C.NOT_FOUND, "receiver: soft_tokens.task: no bridge is loaded for task 'sst2'; loaded tasks: []",
                      exact=True)
    finally:
        service.stop()


def test_serve_pair_process_serves_both_and_drains_on_sigterm(tmp_path, tiny_bridges_dir, reference):
    """`telepathy serve pair` as deployed: one process, one port, SIGTERM drains in-flight relays and exits 0."""
    import signal

    from tests.services_support import ServiceProcess, free_port

    pair = ServiceProcess("pair", free_port(), tiny_bridges_dir, tmp_path, "--max-queue-delay-ms", "1000",
                          env={"TELEPATHY_FAST_PATH": "on"})
    try:
        pair.wait_serving()
        stub = sender_stub(pair.address)
        got = stub.Relay(relay(task="trec", text=TEXTS[1]), timeout=TIMEOUT)
        assert _probs(got.result) == pytest.approx(reference(TEXTS[1], "trec"), abs=1e-5)
        assert receiver_stub(pair.address).Info(receiver_pb2.ReceiverInfoRequest(), timeout=TIMEOUT).model.spec == "random:tiny-gemma"
        in_flight = [stub.Relay.future(relay(text=f"film {i}", request_id=f"r{i}"), timeout=TIMEOUT) for i in range(4)]
        time.sleep(0.3)  # queued: they wait up to 1 s for batch-mates
        pair.signal(signal.SIGTERM)
        assert sorted(f.result(timeout=TIMEOUT).result.request_id for f in in_flight) == [f"r{i}" for i in range(4)]
        assert pair.wait_exit() == 0, pair.log()
        assert "pair draining" in pair.log()
    finally:
        pair.kill()


def test_serve_refuses_options_of_another_role(capsys):
    from telepathy.cli import main as telepathy

    assert telepathy(["serve", "receiver", "--receiver-model", "random:tiny-gemma"]) == 2
    assert capsys.readouterr().err.strip() == "telepathy serve receiver: --receiver-model does not apply to this role"
    assert telepathy(["serve", "sender", "--receiver-model", "x", "--receiver-device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == "telepathy serve sender: --receiver-model, --receiver-device do not apply to this role"
