"""A service goes away → the gateway answers 503 (and /readyz says which one) → the service comes back on the same
port → the gateway recovers on its own, over the same long-lived channel, without a restart.

Real services (tiny random pair, in-process), real uvicorn, httpx over loopback.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from telepathy.bridge.models import TINY_RECEIVER, TINY_SENDER
from telepathy.gateway.settings import GatewaySettings
from telepathy.receiver_service.app import build_receiver
from telepathy.receiver_service.settings import ReceiverSettings
from telepathy.sender_service.app import build_sender
from telepathy.sender_service.settings import SenderSettings
from telepathy.serving.lifecycle import WARMUP_PHASE
from telepathy.testing import GatewayThread, ServiceThread, make_untrained_bridges

SST2 = {"text": "a gripping , beautifully acted film", "task": "sst2"}
UNAVAILABLE = {"error": {"type": "service_unavailable", "message": "the sender service is unavailable; retry later",
                         "param": None}}


def _eventually(check, timeout: float = 20.0, every: float = 0.1):
    end = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > end:
            return result
        time.sleep(every)


@pytest.fixture(scope="module")
def bridges(tmp_path_factory, tiny_sender, tiny_receiver):
    return str(make_untrained_bridges(tmp_path_factory.mktemp("recovery-bridges"), tiny_sender, tiny_receiver,
                                      tasks=["sst2"], sender_layer=2))


def test_service_stopped_gives_503_then_recovers(bridges, tiny_sender, tiny_receiver):
    def receiver_on(port: int) -> ServiceThread:
        return ServiceThread(lambda: build_receiver(ReceiverSettings(
            model=TINY_RECEIVER, bridges=bridges, port=port, max_batch_size=2, grace_s=0.5), tiny_receiver),
            "receiver").start()

    def sender_on(port: int, receiver_addr: str) -> ServiceThread:
        # receiver_wait_s: how long a request waits for a lost receiver before UNAVAILABLE (default 5 s).
        return ServiceThread(lambda: build_sender(SenderSettings(
            model=TINY_SENDER, bridges=bridges, port=port, receiver_addr=receiver_addr, max_batch_size=2,
            grace_s=0.5, receiver_wait_s=0.5), tiny_sender), "sender").start()

    receiver = receiver_on(0)
    sender = sender_on(0, receiver.address)
    r_port, s_port = receiver.port, sender.port
    gw = GatewayThread(GatewaySettings(port=0, sender_addr=sender.address, receiver_addr=receiver.address)).start()
    c = httpx.Client(base_url=gw.url, timeout=30.0)
    try:
        assert c.post("/v1/classify", json=SST2).status_code == 200

        # -- the sender goes away --------------------------------------------------------------------------------
        sender.stop(grace=0.5)
        r = c.post("/v1/classify", json=SST2)
        assert r.status_code == 503 and r.json() == UNAVAILABLE and r.headers["retry-after"] == "1"
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["services"] == {"sender": "UNAVAILABLE", "receiver": "SERVING", "link": "UNAVAILABLE"}
        assert c.get("/healthz").status_code == 200  # the gateway itself is alive: don't restart it

        sender = sender_on(s_port, receiver.address)
        assert _eventually(lambda: c.get("/readyz").status_code == 200)
        r = c.post("/v1/classify", json=SST2)
        assert r.status_code == 200, r.text

        # -- the receiver goes away (the sender stays up and reports UNAVAILABLE) --------------------------------
        receiver.stop(grace=0.5)
        r = c.post("/v1/classify", json=SST2)
        assert r.status_code == 503 and r.json() == UNAVAILABLE, r.text
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["services"] == {"sender": "SERVING", "receiver": "UNAVAILABLE", "link": "DISCONNECTED"}

        receiver = receiver_on(r_port)
        assert _eventually(lambda: c.get("/readyz").status_code == 200)
        # The sender re-opens its stream with backoff: requests succeed once it is back.
        assert _eventually(lambda: c.post("/v1/classify", json=SST2).status_code == 200)
        assert c.post("/v1/classify", json={**SST2, "path": "text"}).status_code == 200
    finally:
        c.close()
        gw.stop()
        sender.stop(grace=0.5)
        receiver.stop(grace=0.5)


def test_readyz_says_what_start_up_waits_for(bridges, tiny_sender, tiny_receiver):
    """/readyz during start-up: 503 naming what each starting service does (its model, its warm-up), then 200."""
    gates = {"receiver": threading.Event(), "sender": threading.Event()}

    def held(service, name):
        warm = service.warmup
        service.warmup = lambda: (gates[name].wait(), warm())  # the real warm-up, once the test has looked
        return service

    receiver = ServiceThread(lambda: held(build_receiver(ReceiverSettings(
        model=TINY_RECEIVER, bridges=bridges, port=0, grace_s=0.5), tiny_receiver), "receiver"),
        "receiver").start(wait=False)
    sender = gw = None
    try:
        _eventually(lambda: receiver.service.state.loaded)
        sender = ServiceThread(lambda: held(build_sender(SenderSettings(
            model=TINY_SENDER, bridges=bridges, port=0, receiver_addr=receiver.address, grace_s=0.5), tiny_sender),
            "sender"), "sender").start(wait=False)
        _eventually(lambda: sender.service.state.loaded)
        gw = GatewayThread(GatewaySettings(port=0, sender_addr=sender.address, receiver_addr=receiver.address)).start()
        with httpx.Client(base_url=gw.url, timeout=30.0) as c:
            r = c.get("/readyz")
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["waiting"] == {"sender": WARMUP_PHASE, "receiver": WARMUP_PHASE}
            assert r.json()["error"]["message"] == (
                f"not ready: sender NOT_SERVING, receiver NOT_SERVING, link DISCONNECTED; sender is {WARMUP_PHASE}; "
                f"receiver is {WARMUP_PHASE}")
            gates["receiver"].set()
            assert _eventually(lambda: c.get("/readyz").json().get("waiting") == {"sender": WARMUP_PHASE})
            gates["sender"].set()
            assert _eventually(lambda: c.get("/readyz").status_code == 200)
            assert "waiting" not in c.get("/readyz").json()
            assert c.post("/v1/classify", json=SST2).status_code == 200
    finally:
        for gate in gates.values():
            gate.set()
        for thread in (gw, sender, receiver):
            if thread is not None:
                thread.stop()
