"""Scale-out: one sender spreads its streams over several receiver replicas behind one multi-address target."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.services_support import TIMEOUT, free_port, metric, relay, scrape, sender_stub, start_receiver, start_sender


def test_sender_streams_balance_across_receiver_replicas(tiny_bridges_dir):
    metrics_ports = [free_port(), free_port()]
    receivers = [start_receiver(tiny_bridges_dir, metrics_port=p) for p in metrics_ports]
    # The same thing a Kubernetes headless Service gives through dns:///: one name, several addresses.
    target = "ipv4:" + ",".join(r.address for r in receivers)
    sender = start_sender(tiny_bridges_dir, target, receiver_streams=4)
    try:
        stub = sender_stub(sender.address)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: stub.Relay(relay(text=f"review number {i}"), timeout=TIMEOUT), range(40)))
        assert all(a.result.label in ("negative", "positive") for a in answers)
        served = [metric(scrape(p), "telepathy_requests_total", method="ClassifyStream.item", code="OK") for p in metrics_ports]
        assert sum(served) == 40 and min(served) > 0, served
    finally:
        sender.stop()
        for r in receivers:
            r.stop()
