"""Start-up and drain in-process: NOT_SERVING while loading, drain answers everything in flight."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.models import TINY_RECEIVER
from telepathy.protos.v1 import receiver_pb2
from telepathy.receiver_service.app import build_receiver
from telepathy.receiver_service.settings import ReceiverSettings
from telepathy.serving.channels import make_sync_channel
from telepathy.testing import ServiceThread
from tests.services_support import (
    TIMEOUT,
    assert_status,
    free_port,
    metric,
    receiver_stub,
    relay,
    rpc_error,
    sender_stub,
    start_receiver,
    start_sender,
    wait_for,
)

C = grpc.StatusCode
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _health(address: str, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(make_sync_channel(address))
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_not_serving_and_unavailable_while_loading(tiny_bridges_dir):
    gate = threading.Event()
    lm = LanguageModel.load(TINY_RECEIVER)

    def factory():
        service = build_receiver(ReceiverSettings(port=0, model=TINY_RECEIVER, bridges=str(tiny_bridges_dir)), lm)
        service.executor.submit(gate.wait)  # the model thread is busy, so loading waits behind this
        return service

    receiver = ServiceThread(factory, "receiver").start(wait=False)
    try:
        wait_for(lambda: receiver.service.port is not None, what="the port to be bound")
        address = f"127.0.0.1:{receiver.service.port}"
        assert _health(address) == NOT_SERVING and _health(address, "telepathy.v1.Receiver") == NOT_SERVING
        stub = receiver_stub(address)
        err = rpc_error(stub.ClassifyText, receiver_pb2.ClassifyTextRequest(task="sst2", text="hi"), timeout=TIMEOUT)
        assert_status(err, C.UNAVAILABLE, f"receiver is loading its model ({TINY_RECEIVER}); retry shortly",
                      exact=True)
        err = rpc_error(stub.Info, receiver_pb2.ReceiverInfoRequest(), timeout=TIMEOUT)
        assert_status(err, C.UNAVAILABLE, f"receiver is loading its model ({TINY_RECEIVER}); retry shortly",
                      exact=True)
        gate.set()
        receiver.wait_started(TIMEOUT)
        assert _health(address) == SERVING
        assert stub.ClassifyText(receiver_pb2.ClassifyTextRequest(task="sst2", text="hi"), timeout=TIMEOUT).result.task == "sst2"
    finally:
        gate.set()
        receiver.stop()


def test_info_and_refusals_say_what_start_up_waits_for(tiny_bridges_dir):
    """While it warms up, a service answers Info (state says so) and refuses inference naming the warm-up."""
    gate = threading.Event()
    lm = LanguageModel.load(TINY_RECEIVER)

    def factory():
        service = build_receiver(ReceiverSettings(port=0, model=TINY_RECEIVER, bridges=str(tiny_bridges_dir)), lm)
        warm = service.warmup
        service.warmup = lambda: (gate.wait(), warm())  # hold the real warm-up until the test has looked
        return service

    receiver = ServiceThread(factory, "receiver").start(wait=False)
    try:
        wait_for(lambda: receiver.service.state.loaded, what="the model to load")
        stub = receiver_stub(receiver.address)
        warming = ("warming up (a first batch through every bridge and the text path; on CUDA every batch "
                   "size)")
        assert stub.Info(receiver_pb2.ReceiverInfoRequest(), timeout=TIMEOUT).state == warming
        err = rpc_error(stub.ClassifyText, receiver_pb2.ClassifyTextRequest(task="sst2", text="hi"), timeout=TIMEOUT)
        assert_status(err, C.UNAVAILABLE, f"receiver is {warming}; retry shortly", exact=True)
        assert _health(receiver.address) == NOT_SERVING
        gate.set()
        receiver.wait_started(TIMEOUT)
        assert stub.Info(receiver_pb2.ReceiverInfoRequest(), timeout=TIMEOUT).state == "serving"
        assert stub.ClassifyText(receiver_pb2.ClassifyTextRequest(task="sst2", text="hi"), timeout=TIMEOUT).result.task == "sst2"
    finally:
        gate.set()
        receiver.stop()


def test_receiver_drain_answers_in_flight_and_turns_not_serving(tiny_bridges_dir):
    receiver = start_receiver(tiny_bridges_dir, max_batch_size=64, max_queue_delay_ms=5000, warmup=False)
    sender = start_sender(tiny_bridges_dir, receiver.address, receiver_wait_s=0.5)
    try:
        stub = sender_stub(sender.address)
        in_flight = [stub.Relay.future(relay(text=f"film number {i}", request_id=str(i)), timeout=TIMEOUT) for i in range(6)]
        wait_for(lambda: receiver.service.soft_tokens.depth == 6, what="6 requests queued on the receiver")
        health = health_pb2_grpc.HealthStub(make_sync_channel(receiver.address))
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert next(watch).status == SERVING
        stopper = threading.Thread(target=receiver.stop)
        stopper.start()
        assert next(watch).status == NOT_SERVING  # announced before the port closes
        # Drain flushes the queue at once (no waiting the 5 s for batch-mates) and answers every accepted request.
        assert [f.result().result.request_id for f in in_flight] == [str(i) for i in range(6)]
        stopper.join(TIMEOUT)
        assert not stopper.is_alive()
        err = rpc_error(stub.Relay, relay(), timeout=TIMEOUT)  # nobody left to answer: fails fast, no hang
        assert_status(err, C.UNAVAILABLE, f"receiver {receiver.address} is unavailable")
    finally:
        sender.stop()
        receiver.stop()


def test_sender_drain_finishes_queued_relays(tiny_bridges_dir):
    receiver = start_receiver(tiny_bridges_dir)
    sender = start_sender(tiny_bridges_dir, receiver.address, max_batch_size=64, max_queue_delay_ms=5000, warmup=False)
    try:
        stub = sender_stub(sender.address)
        in_flight = [stub.Relay.future(relay(request_id=str(i)), timeout=TIMEOUT) for i in range(5)]
        wait_for(lambda: sender.service.encoder.depth == 5, what="5 requests queued on the sender")
        sender.stop()
        assert [f.result().result.request_id for f in in_flight] == [str(i) for i in range(5)]
        with pytest.raises(grpc.RpcError) as info:
            stub.Relay(relay(), timeout=2)
        assert info.value.code() == C.UNAVAILABLE
    finally:
        receiver.stop()


def test_items_refused_by_a_draining_receiver_are_resent_to_its_successor(tiny_bridges_dir):
    """The receiver answers UNAVAILABLE only for items it did not process, so the sender may resend them."""
    port = free_port()
    first = start_receiver(tiny_bridges_dir, port=port, max_queue_delay_ms=0)
    sender = start_sender(tiny_bridges_dir, first.address, receiver_wait_s=20.0)
    stub = sender_stub(sender.address)
    gate = threading.Event()
    second = None
    try:
        assert stub.Relay(relay(), timeout=TIMEOUT).result.task == "sst2"
        first.service.executor.submit(gate.wait)  # the receiver's model thread is busy until we say so
        in_flight = stub.Relay.future(relay(request_id="in-flight"), timeout=TIMEOUT)
        wait_for(lambda: first.service.servicer.stream_items_in_flight == 1, what="an item in flight on the receiver")
        stopper = threading.Thread(target=first.stop)
        stopper.start()
        wait_for(lambda: first.service.state.draining, what="the receiver to drain")
        refused = stub.Relay.future(relay(request_id="refused"), timeout=TIMEOUT)
        refusals = lambda: metric(first.service.metrics.render().decode(), "telepathy_requests_total",  # noqa: E731
                                  method="ClassifyStream.item", code="UNAVAILABLE")
        wait_for(lambda: refusals() == 1, what="the draining receiver to refuse the new item")
        gate.set()
        assert in_flight.result().result.request_id == "in-flight"  # drained: the accepted item is answered
        stopper.join(TIMEOUT)
        second = start_receiver(tiny_bridges_dir, port=port)
        assert refused.result().result.request_id == "refused"  # resent on the new stream, answered once
        assert metric(second.service.metrics.render().decode(), "telepathy_requests_total",
                      method="ClassifyStream.item", code="OK") == 1
    finally:
        gate.set()
        sender.stop()
        first.stop()
        if second is not None:
            second.stop()
