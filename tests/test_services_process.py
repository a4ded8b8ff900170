"""Real `telepathy serve` processes: receiver restarts under a live sender, SIGTERM drains on both services."""

from __future__ import annotations

import signal
import time

import grpc
import pytest

from telepathy.protos.v1 import sender_pb2
from tests.services_support import (
    TIMEOUT,
    ServiceProcess,
    assert_status,
    free_port,
    metric,
    relay,
    rpc_error,
    scrape,
    sender_stub,
    start_receiver,
    start_sender,
    wait_for,
)

C = grpc.StatusCode
HOLD = ["--max-batch-size", "16", "--max-queue-delay-ms", "1500"]  # requests wait in the queue: "in flight" for sure


def _queued(metrics_port: int, batcher: str) -> float:
    try:
        return metric(scrape(metrics_port), "telepathy_queue_depth", batcher=batcher)
    except OSError:
        return -1.0


def _fire(stub, n: int, tag: str):
    return [stub.Relay.future(relay(text=f"{tag} film {i}", request_id=f"{tag}-{i}"), timeout=TIMEOUT) for i in range(n)]


def _outcome(future) -> str:
    try:
        return future.result(timeout=TIMEOUT).result.request_id
    except grpc.RpcError as exc:
        return exc.code().name


def test_receiver_restarts_under_a_live_sender(tmp_path, tiny_bridges_dir):
    port, metrics_port = free_port(), free_port()

    def receiver() -> ServiceProcess:
        return ServiceProcess("receiver", port, tiny_bridges_dir, tmp_path, *HOLD, "--metrics-port", str(metrics_port)).wait_serving()

    first = receiver()
    sender = start_sender(tiny_bridges_dir, f"127.0.0.1:{port}", receiver_wait_s=1.0)
    stub = sender_stub(sender.address)
    second = None
    try:
        assert stub.Relay(relay(), timeout=TIMEOUT).result.task == "sst2"

        # SIGTERM with 6 requests queued on the receiver: drained, every one answered, clean exit.
        in_flight = _fire(stub, 6, "drain")
        wait_for(lambda: _queued(metrics_port, "receiver_soft_tokens") == 6, what="6 requests queued on the receiver")
        first.signal(signal.SIGTERM)
        assert [_outcome(f) for f in in_flight] == [f"drain-{i}" for i in range(6)]
        assert first.wait_exit() == 0, first.log()
        assert "receiver stopped" in first.log()

        # No receiver: a request fails fast with UNAVAILABLE instead of hanging.
        started = time.monotonic()
        err = rpc_error(stub.Relay, relay(), timeout=TIMEOUT)
        assert_status(err, C.UNAVAILABLE, f"receiver 127.0.0.1:{port} is unavailable")
        assert time.monotonic() - started < 10

        # A new receiver on the same port: the sender reconnects by itself.
        second = receiver()
        wait_for(lambda: sender.service.link.connected, timeout=30, what="the sender to reconnect")
        assert stub.Relay(relay(), timeout=TIMEOUT).result.task == "sst2"

        # SIGKILL with 6 requests queued: each is answered or fails UNAVAILABLE, none hangs.
        in_flight = _fire(stub, 6, "kill")
        wait_for(lambda: _queued(metrics_port, "receiver_soft_tokens") == 6, what="6 requests queued on the receiver")
        second.signal(signal.SIGKILL)
        outcomes = [_outcome(f) for f in in_flight]
        assert all(o in (f"kill-{i}", "UNAVAILABLE") for i, o in enumerate(outcomes)), outcomes
        second.wait_exit()

        third = receiver()
        second = third
        wait_for(lambda: sender.service.link.connected, timeout=30, what="the sender to reconnect again")
        assert [_outcome(f) for f in _fire(stub, 4, "after")] == [f"after-{i}" for i in range(4)]
        assert metric(sender.service.metrics.render().decode(), "telepathy_receiver_reconnects_total") == 3
    finally:
        sender.stop()
        for proc in (first, second):
            if proc is not None:
                proc.kill()


def test_sender_sigterm_drains_in_flight_relays(tmp_path, tiny_bridges_dir):
    receiver = start_receiver(tiny_bridges_dir)
    port, metrics_port = free_port(), free_port()
    sender = ServiceProcess("sender", port, tiny_bridges_dir, tmp_path, *HOLD, "--metrics-port", str(metrics_port),
                            "--receiver-addr", receiver.address, env={"TELEPATHY_GRACE_S": "20"})
    try:
        sender.wait_serving()
        stub = sender_stub(sender.address)
        info = stub.Info(sender_pb2.SenderInfoRequest(), timeout=TIMEOUT)
        assert info.receiver_connected and info.limits.max_queue_delay_ms == 1500  # CLI flags and env both applied
        in_flight = _fire(stub, 8, "drain")
        wait_for(lambda: _queued(metrics_port, "sender_encode") == 8, what="8 requests queued on the sender")
        sender.signal(signal.SIGTERM)
        assert [_outcome(f) for f in in_flight] == [f"drain-{i}" for i in range(8)]
        assert sender.wait_exit() == 0, sender.log()
        assert "sender draining (grace 20.0s)" in sender.log()
        with pytest.raises(grpc.RpcError) as info:
            stub.Relay(relay(), timeout=2)
        assert info.value.code() == C.UNAVAILABLE
    finally:
        sender.kill()
        receiver.stop()
