"""Overload and deadlines: a full queue answers RESOURCE_EXHAUSTED at once; expired work is never run."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from telepathy.protos.v1 import receiver_pb2, sender_pb2
from telepathy.serving.batcher import DeadlineExpiredError, DynamicBatcher, QueueFullError
from tests.services_support import (
    TIMEOUT,
    assert_status,
    classify_request,
    metric,
    receiver_stub,
    relay,
    rpc_error,
    sender_stub,
    soft_tokens_for,
    start_receiver,
    start_sender,
    wait_for,
)

C = grpc.StatusCode
SLOW_MS = 1000  # queue delay of the slow services: requests sit in the queue, waiting for batch-mates


@pytest.fixture(scope="module")
def slow(tiny_bridges_dir):
    """A receiver and a sender that hold requests in their queues for SLOW_MS (batches of 64 never fill)."""
    receiver = start_receiver(tiny_bridges_dir, max_batch_size=64, max_queue_delay_ms=SLOW_MS, max_queue_size=3, warmup=False)
    sender = start_sender(tiny_bridges_dir, receiver.address, max_batch_size=64, max_queue_delay_ms=SLOW_MS,
                          max_queue_size=2, warmup=False)
    yield sender, receiver
    sender.stop()
    receiver.stop()


def _metrics(thread) -> str:
    return thread.service.metrics.render().decode()


def _batches(thread, batcher: str) -> float:
    return metric(_metrics(thread), "telepathy_batch_size_count", batcher=batcher)


def test_receiver_queue_full_is_resource_exhausted_at_once(slow):
    sender, receiver = slow
    st = soft_tokens_for(sender.address, "a fine film", "sst2")
    stub = receiver_stub(receiver.address)
    waiting = [stub.Classify.future(classify_request(st), timeout=TIMEOUT) for _ in range(3)]
    wait_for(lambda: receiver.service.soft_tokens.depth == 3, what="3 queued requests")
    started = time.monotonic()
    err = rpc_error(stub.Classify, classify_request(st), timeout=TIMEOUT)
    assert time.monotonic() - started < 1.0  # not after the queue delay: at once
    assert_status(err, C.RESOURCE_EXHAUSTED, "receiver_soft_tokens queue is full (3 requests waiting); retry later", exact=True)
    assert all(f.result().result.task == "sst2" for f in waiting)  # the queued ones are served
    assert stub.Classify(classify_request(st), timeout=TIMEOUT).result.task == "sst2"
    assert metric(_metrics(receiver), "telepathy_skipped_total", batcher="receiver_soft_tokens", reason="queue_full") == 1


def test_sender_queue_full_is_resource_exhausted_at_once(slow):
    sender, _ = slow
    stub = sender_stub(sender.address)
    waiting = [stub.Encode.future(_encode(), timeout=TIMEOUT) for _ in range(2)]
    wait_for(lambda: sender.service.encoder.depth == 2, what="2 queued requests")
    err = rpc_error(stub.Relay, relay(), timeout=TIMEOUT)
    assert_status(err, C.RESOURCE_EXHAUSTED, "sender_encode queue is full (2 requests waiting); retry later", exact=True)
    assert all(f.result().soft_tokens.task == "sst2" for f in waiting)


def _encode() -> sender_pb2.EncodeRequest:
    return sender_pb2.EncodeRequest(task="sst2", text="a fine film")


def test_expired_client_deadline_skips_the_work(slow):
    sender, receiver = slow
    st = soft_tokens_for(sender.address, "a fine film", "sst2")
    stub = receiver_stub(receiver.address)
    batches = _batches(receiver, "receiver_soft_tokens")
    call = stub.Classify.future(classify_request(st), timeout=SLOW_MS / 1000 * 0.6)
    wait_for(lambda: receiver.service.soft_tokens.depth == 1 or call.done(), what="the request to be queued")
    assert call.exception(timeout=TIMEOUT).code() == C.DEADLINE_EXCEEDED
    time.sleep(SLOW_MS / 1000 + 0.3)  # past the moment the batch would have run
    assert _batches(receiver, "receiver_soft_tokens") == batches  # the model never ran for it
    text = _metrics(receiver)
    reasons = ("cancelled", "deadline")
    skipped = sum(metric(text, "telepathy_skipped_total", batcher="receiver_soft_tokens", reason=r) for r in reasons)
    assert skipped >= 1  # whichever noticed first: gRPC cancelling the call, or the batcher's deadline timer
    # The client's deadline passes first; the server sees either its own deadline or the client's cancel.
    assert sum(metric(text, "telepathy_requests_total", method="Classify", code=c) for c in ("DEADLINE_EXCEEDED", "CANCELLED")) >= 1
    assert stub.Classify(classify_request(st), timeout=TIMEOUT).result.task == "sst2"  # still works


def test_stream_item_deadline_is_answered_deadline_exceeded(slow):
    sender, receiver = slow
    st = soft_tokens_for(sender.address, "a fine film", "sst2")
    st.request_id = "late"
    batches = _batches(receiver, "receiver_soft_tokens")
    item = receiver_pb2.ClassifyStreamRequest(soft_tokens=st, timeout_ms=200)
    (answer,) = list(receiver_stub(receiver.address).ClassifyStream(iter([item]), timeout=TIMEOUT))
    assert answer.request_id == "late"
    assert answer.error.code == C.DEADLINE_EXCEEDED.value[0]
    assert answer.error.message == "deadline exceeded while queued; the request was not run"
    assert _batches(receiver, "receiver_soft_tokens") == batches
    assert metric(_metrics(receiver), "telepathy_skipped_total", batcher="receiver_soft_tokens", reason="deadline") >= 1


def test_relay_deadline_reaches_the_receiver(slow, tiny_bridges_dir):
    """The sender forwards its caller's remaining deadline as timeout_ms; the receiver skips the work."""
    _, receiver = slow
    sender = start_sender(tiny_bridges_dir, receiver.address)  # quick sender, slow receiver
    try:
        batches = _batches(receiver, "receiver_soft_tokens")
        started = time.monotonic()
        err = rpc_error(sender_stub(sender.address).Relay, relay(), timeout=0.5)
        assert err.code() == C.DEADLINE_EXCEEDED and time.monotonic() - started < SLOW_MS / 1000
        time.sleep(SLOW_MS / 1000 + 0.3)
        assert _batches(receiver, "receiver_soft_tokens") == batches
        assert metric(_metrics(receiver), "telepathy_skipped_total", batcher="receiver_soft_tokens", reason="deadline") >= 1
    finally:
        sender.stop()


def test_batcher_groups_by_key_and_respects_limits():
    """DynamicBatcher alone: batches by key up to max size, in arrival order; bounded queue; deadlines."""
    calls: list[tuple[str, list[int]]] = []

    def run(key, items):
        calls.append((key, list(items)))
        return [i * 10 for i in items]

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            b = DynamicBatcher("t", run, max_batch_size=3, max_queue_delay_s=0.05, max_queue_size=8, executor=pool)
            b.start()
            jobs = [asyncio.create_task(b.submit(i, key="a" if i % 2 == 0 else "b")) for i in range(8)]
            await asyncio.sleep(0)
            with pytest.raises(QueueFullError):
                await b.submit(99, key="a")
            results = await asyncio.gather(*jobs)
            with pytest.raises(DeadlineExpiredError):
                await b.submit(1, key="a", deadline=time.monotonic() - 1)
            await b.close()
            return results

    results = asyncio.run(scenario())
    assert [r for r, _ in results] == [i * 10 for i in range(8)]
    assert calls == [("a", [0, 2, 4]), ("b", [1, 3, 5]), ("a", [6]), ("b", [7])]
    assert [t.batch_size for _, t in results] == [3, 3, 3, 3, 3, 3, 1, 1]


def test_batcher_deadline_answers_on_time_and_the_next_request_keeps_its_delay():
    calls: list[list[int]] = []

    def run(key, items):
        calls.append(list(items))
        return items

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            b = DynamicBatcher("t", run, max_batch_size=8, max_queue_delay_s=0.3, max_queue_size=8, executor=pool)
            b.start()
            started = time.monotonic()
            with pytest.raises(DeadlineExpiredError, match="deadline exceeded while queued; the request was not run"):
                await b.submit(1, key="a", deadline=started + 0.05)
            assert time.monotonic() - started < 0.25  # answered at its deadline, not when the batch would close
            _, timing = await b.submit(2, key="a")
            await b.close()
            return timing

    timing = asyncio.run(scenario())
    assert calls == [[2]]  # the expired request never ran
    assert timing.queue_s >= 0.25  # the next request still waited for batch-mates


def test_batcher_pipelines_deferred_batches_up_to_the_limit():
    """run_batch returning a Deferred (work queued on the device): the next batch starts before the first is
    answered, never more than max_in_flight at once, answers keep their order, a failed wait fails its batch only."""
    import threading

    from telepathy.serving.batcher import Deferred

    started: list[list[int]] = []
    release = {i: threading.Event() for i in range(4)}
    in_flight, most = [0], [0]
    lock = threading.Lock()

    def run(key, items):
        n = len(started)
        started.append(list(items))
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])

        def wait():
            release[n].wait(10)
            with lock:
                in_flight[0] -= 1
            if n == 2:
                raise ValueError("device fault")
            return [i * 10 for i in items]

        return Deferred(wait)

    async def scenario():
        with ThreadPoolExecutor(1) as pool, ThreadPoolExecutor(1) as waiter:
            b = DynamicBatcher("t", run, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=8, executor=pool,
                               waiter=waiter, max_in_flight=2)
            b.start()
            jobs = [asyncio.create_task(b.submit(i, key="a")) for i in range(4)]
            for _ in range(100):  # two batches start, the third waits for a free slot
                await asyncio.sleep(0.01)
            assert started == [[0], [1]]
            release[0].set()
            while len(started) < 3:
                await asyncio.sleep(0.01)
            for i in (1, 2, 3):
                release[i].set()
            results = await asyncio.gather(*jobs, return_exceptions=True)
            await b.close()
            return results

    results = asyncio.run(scenario())
    assert started == [[0], [1], [2], [3]] and most[0] == 2
    assert [r[0] for r in (results[0], results[1], results[3])] == [0, 10, 30]
    assert isinstance(results[2], ValueError) and str(results[2]) == "device fault"
