"""Long work never wedges a service: the text path reads a bounded input, and a generation nobody waits for stops.

The sender has one model thread. A relay generation whose caller went away (cancelled, or past its deadline) used
to hold that thread to the end, so the next request, bridge path included, waited behind it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from telepathy.bridge.runtime.engine import ReceiverEngine, SenderEngine, load_bridge_set
from telepathy.protos.v1 import sender_pb2
from telepathy.serving.batcher import DeadlineExpiredError, DynamicBatcher
from tests.services_support import TIMEOUT, metric, relay, sender_stub, start_receiver, start_sender

C = grpc.StatusCode
LONG_TEXT = "The committee met again on Tuesday to review the budget, line by line. " * 56  # 3,976 characters: just under the 4,000 limit
# Random tiny models rarely emit EOS, so a relay runs to its full length: long enough (~1-3 s on 2 CPU cores)
# that a generation left running would show in the next request's latency. tiny-llama has 1024 positions, 256 of them the prompt.
RELAY_TOKENS = 700


# ---- the batcher tells a stoppable batch when nobody waits for it --------------------------------------------
def _run(coro):
    return asyncio.run(coro)


async def _batcher_with(run_batch, **kw) -> DynamicBatcher:
    b = DynamicBatcher("gen", max_batch_size=4, max_queue_delay_s=0.0, max_queue_size=8,
                       executor=ThreadPoolExecutor(1), run_batch=run_batch, stoppable=True, **kw)
    b.start()
    return b


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_a_stoppable_batch_learns_its_caller_is_gone(how):
    seen: list[bool] = []

    def run_batch(key, items, abandoned: threading.Event):
        if items == ["long"]:
            seen.append(abandoned.wait(10.0))  # a long generation that checks the event once per token
        return [f"done {i}" for i in items]

    async def main():
        b = await _batcher_with(run_batch)
        if how == "deadline":
            with pytest.raises(DeadlineExpiredError, match="deadline exceeded during the model call"):
                await b.submit("long", key="k", deadline=time.monotonic() + 0.2)
        else:
            call = asyncio.ensure_future(b.submit("long", key="k"))
            await asyncio.sleep(0.2)
            call.cancel()
        await asyncio.sleep(0.1)
        # The batch ended because its caller went away, well before its 10 s, and the batcher still serves.
        assert seen == [True]
        result, _ = await b.submit("y", key="k", deadline=time.monotonic() + 5.0)
        assert result == "done y"
        await b.close()

    _run(main())


def test_a_batch_is_not_abandoned_while_one_caller_still_waits():
    seen: list[bool] = []

    def run_batch(key, items, abandoned: threading.Event):
        seen.append(abandoned.wait(0.5))
        return [f"done {i}" for i in items]

    async def main():
        b = await _batcher_with(run_batch)
        b.max_queue_delay_s = 0.05  # so both requests share one batch
        gone = asyncio.ensure_future(b.submit("a", key="k"))
        stays = asyncio.ensure_future(b.submit("b", key="k"))
        await asyncio.sleep(0.1)
        gone.cancel()
        result, timing = await stays
        assert (result, timing.batch_size, seen) == ("done b", 2, [False])
        await b.close()

    _run(main())


def test_a_batcher_that_is_not_stoppable_calls_with_two_arguments():
    async def main():
        b = DynamicBatcher("enc", max_batch_size=2, max_queue_delay_s=0.0, max_queue_size=4,
                           executor=ThreadPoolExecutor(1), run_batch=lambda key, items: [i * 2 for i in items])
        b.start()
        assert (await b.submit(21, key="k"))[0] == 42
        await b.close()

    _run(main())


# ---- the text path reads a bounded input ---------------------------------------------------------------------
def test_relay_and_receiver_read_at_most_the_token_bound(tiny_sender, tiny_receiver, tiny_bridges_dir):
    sender = SenderEngine(tiny_sender, load_bridge_set(tiny_bridges_dir, tiny_sender, "sender", "cpu"))
    cut = tiny_sender.truncate(LONG_TEXT, sender.max_text_tokens)
    assert LONG_TEXT.startswith(cut) and len(cut) < len(LONG_TEXT)
    assert tiny_sender.token_count(cut) <= sender.max_text_tokens + 2  # + BOS/EOS the count adds
    assert tiny_sender.truncate("short text", 256) == "short text"
    # The relay of the long text is the relay of its cut: the sender never reads past the bound.
    assert sender.relay([LONG_TEXT], "sst2", 4) == sender.relay([cut], "sst2", 4)

    receiver = ReceiverEngine(tiny_receiver, load_bridge_set(tiny_bridges_dir, tiny_receiver, "receiver", "cpu"))
    cut = tiny_receiver.truncate(LONG_TEXT, receiver.max_input_tokens)
    long, short = receiver.classify_text([LONG_TEXT, cut], "trec")
    assert long.tolist() == pytest.approx(short.tolist(), abs=1e-5)


# ---- a cancelled text request does not delay the next one ----------------------------------------------------
@pytest.fixture(scope="module")
def services(tiny_bridges_dir):
    receiver = start_receiver(tiny_bridges_dir)
    sender = start_sender(tiny_bridges_dir, receiver.address, max_relay_tokens=RELAY_TOKENS,
                          request_timeout_s=120.0)
    yield sender
    sender.stop()
    receiver.stop()


def _timed(call, *args, **kwargs) -> float:
    started = time.perf_counter()
    call(*args, **kwargs)
    return time.perf_counter() - started


def test_a_cancelled_or_expired_text_request_does_not_delay_the_next(services, tiny_sender):
    stub = sender_stub(services.address)
    text_request = relay(text=LONG_TEXT, path=sender_pb2.PATH_TEXT, max_relay_tokens=RELAY_TOKENS)
    bridge = _timed(stub.Relay, relay(), timeout=TIMEOUT)  # warm
    # Side by side in this run: what a full relay generation costs here, and what a bridge request costs.
    full = stub.Relay(text_request, timeout=120.0)
    full_s = full.result.timings_us["sender_model"] / 1e6
    assert tiny_sender.token_count(full.relay_text) >= RELAY_TOKENS // 2, "the relay ended early: this proves nothing"
    bridge = min(bridge, _timed(stub.Relay, relay(), timeout=TIMEOUT))
    stopped_before = metric(services.service.metrics.render().decode(), "telepathy_batches_stopped_total",
                            batcher="sender_generate")

    # 1. past its deadline: the caller gets DEADLINE_EXCEEDED and the generation stops.
    with pytest.raises(grpc.RpcError) as info:
        stub.Relay(text_request, timeout=0.3)
    assert info.value.code() == C.DEADLINE_EXCEEDED
    after_deadline = _timed(stub.Relay, relay(), timeout=TIMEOUT)

    # 2. cancelled by its caller.
    call = stub.Relay.future(text_request, timeout=120.0)
    time.sleep(0.3)
    call.cancel()
    after_cancel = _timed(stub.Relay, relay(), timeout=TIMEOUT)

    # Had the generation run on, the next request would have waited most of full_s behind it.
    print(f"full relay {full_s:.2f} s, bridge {bridge:.3f} s, after deadline {after_deadline:.3f} s, after cancel {after_cancel:.3f} s")
    for waited in (after_deadline, after_cancel):
        assert waited < bridge + full_s / 3, (waited, bridge, full_s)
    stopped = metric(services.service.metrics.render().decode(), "telepathy_batches_stopped_total",
                     batcher="sender_generate")
    assert stopped - stopped_before == 2
    # And the text path still answers in full.
    assert stub.Relay(relay(path=sender_pb2.PATH_TEXT, max_relay_tokens=4), timeout=TIMEOUT).result.label

