"""ReceiverLink: the sender's one channel and one bidirectional ClassifyStream to the receiver.

Every request of this sender is multiplexed on the stream under a link-assigned id (caller ids may be empty
or collide), answers come back in any order. Delivery rules, so that nothing is lost or duplicated:

  * outbox  — accepted, not yet written. Survives a reconnect: written on the next stream.
  * sent    — written, no answer yet. If the stream breaks these fail with UNAVAILABLE, never resent: the
              receiver may have processed them. Late answers for ids nobody waits for are dropped.
  * held    — answered UNAVAILABLE by a draining receiver, which promises it did not process them; they are
              resent (at most `max_resends` times) on the next stream.

While the stream is down the run loop reconnects with capped, jittered exponential backoff; a request
waits at most `wait_s` for it (and never past its own deadline) before failing with UNAVAILABLE.
The stream itself has no deadline (it lives as long as the process); each item carries its own timeout_ms.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field

import grpc

from telepathy.protos.v1 import common_pb2, receiver_pb2, receiver_pb2_grpc
from telepathy.serving.batcher import DeadlineExpiredError
from telepathy.serving.channels import ClientSettings, call_metadata, make_channel
from telepathy.serving.errors import ServiceError, unavailable
from telepathy.serving.metrics import ServiceMetrics

log = logging.getLogger(__name__)
_STATUS = {c.value[0]: c for c in grpc.StatusCode}
CONNECT_TIMEOUT_S = 5.0  # a black-holed address must not stall the reconnect loop for the OS's TCP timeout


@dataclass(eq=False)
class _Item:
    id: str
    request: receiver_pb2.ClassifyStreamRequest
    deadline: float | None  # time.monotonic()
    future: asyncio.Future = field(repr=False)
    since: float = 0.0  # when it last started waiting for a stream
    resends: int = 0


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, asyncio.TimeoutError):
        return f"no connection within {CONNECT_TIMEOUT_S:.0f}s"
    return repr(exc)


class ReceiverLink:
    def __init__(self, address: str, client: ClientSettings, metrics: ServiceMetrics, *, wait_s: float = 5.0,
                 backoff_initial_s: float = 0.05, backoff_max_s: float = 2.0, max_resends: int = 2):
        self.address = address
        self._client = client
        self._metrics = metrics
        self._wait_s = wait_s
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._max_resends = max_resends
        self._ids = itertools.count(1)
        self._outbox: deque[_Item] = deque()
        self._held: list[_Item] = []
        self._sent: dict[str, _Item] = {}
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._closed = False
        self._last_error = "not connected yet"
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task | None = None
        self._owns_channel = True

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self, channel: grpc.aio.Channel | None = None) -> None:
        """Open the stream in the background; `channel` shares one channel among links (the pool closes it)."""
        self._owns_channel = channel is None
        self._channel = channel or make_channel(self.address, self._client, with_token=False)
        self._stub = receiver_pb2_grpc.ReceiverStub(self._channel)
        self._metadata = call_metadata(self._client)
        self._task = asyncio.create_task(self._run(), name="receiver-link")

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail(list(self._outbox) + self._held + list(self._sent.values()), "the sender is shutting down")
        self._outbox.clear()
        self._held.clear()
        self._sent.clear()
        if self._channel is not None and self._owns_channel:
            await self._channel.close()

    # ---- callers --------------------------------------------------------------------------------------------
    async def call(self, request: receiver_pb2.ClassifyStreamRequest, deadline: float | None) -> common_pb2.ClassifyResult:
        """Send one item and wait for its answer; raises ServiceError / DeadlineExpiredError / TimeoutError."""
        if self._closed:
            raise unavailable("the sender is shutting down")
        if not self._connected.is_set():
            wait = self._wait_s if deadline is None else max(0.0, min(self._wait_s, deadline - time.monotonic()))
            try:
                await asyncio.wait_for(self._connected.wait(), wait)
            except asyncio.TimeoutError:
                raise unavailable(f"receiver {self.address} is unavailable ({self._last_error})") from None
        item_id = str(next(self._ids))
        (request.soft_tokens if request.HasField("soft_tokens") else request.text).request_id = item_id
        item = _Item(item_id, request, deadline, asyncio.get_running_loop().create_future(), time.monotonic())
        self._outbox.append(item)
        self._wake.set()
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            return await asyncio.wait_for(item.future, timeout)
        except asyncio.TimeoutError:
            raise DeadlineExpiredError(f"deadline exceeded waiting for receiver {self.address}") from None
        finally:
            self._sent.pop(item_id, None)
            if item in self._outbox:
                self._outbox.remove(item)
            if item in self._held:
                self._held.remove(item)

    # ---- the stream -----------------------------------------------------------------------------------------
    async def _run(self) -> None:
        delay = self._backoff[0]
        while not self._closed:
            call = self._stub.ClassifyStream(metadata=self._metadata)
            try:
                # The receiver sends its initial metadata as soon as it accepts the stream; a refusal
                # (UNAUTHENTICATED, UNAVAILABLE while draining, …) ends the call instead.
                await asyncio.wait_for(call.initial_metadata(), CONNECT_TIMEOUT_S)
                if call.done():
                    raise grpc.aio.AioRpcError(await call.code(), await call.initial_metadata(),
                                               await call.trailing_metadata(), await call.details())
            except (grpc.aio.AioRpcError, asyncio.TimeoutError) as exc:
                call.cancel()
                if self._last_error != _describe(exc):
                    log.warning("receiver %s unavailable: %s; retrying with backoff", self.address, _describe(exc))
                self._last_error = _describe(exc)
                self._fail_stale()
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self._backoff[1])
                continue
            opened = time.monotonic()
            reason = await self._serve(call)
            # A stream that ends right after opening (a receiver still loading or draining accepts, then ends it)
            # keeps backing off; only one that lived a while resets the backoff.
            delay = self._backoff[0] if time.monotonic() - opened > 1.0 else min(delay * 2, self._backoff[1])
            if not self._closed:
                if self._last_error != reason:
                    log.warning("stream to receiver %s ended (%s); reconnecting", self.address, reason)
                self._last_error = reason
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))

    async def _serve(self, call) -> str:
        """Pump one open stream until it ends; returns why it ended."""
        self._outbox.extendleft(reversed(self._held))
        self._held.clear()
        self._connected.set()
        self._metrics.receiver_connected.set(1)
        self._metrics.reconnects.inc()
        log.info("stream to receiver %s is up", self.address)
        writer_failed: list[BaseException] = []

        def on_writer_done(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                writer_failed.append(task.exception())
                call.cancel()  # wakes the reader below

        writer = asyncio.create_task(self._write(call))
        writer.add_done_callback(on_writer_done)
        reason = "the receiver ended the stream"
        try:
            async for response in call:
                self._deliver(response)
        except grpc.aio.AioRpcError as exc:
            reason = _describe(exc)
        except asyncio.CancelledError:
            if not writer_failed:
                raise
            reason = f"write failed: {writer_failed[0]!r}"
        finally:
            writer.cancel()
            call.cancel()
            self._connected.clear()
            self._metrics.receiver_connected.set(0)
            sent = list(self._sent.values())
            self._sent.clear()
            self._fail(sent, f"lost the stream to receiver {self.address} before the answer arrived ({reason}); "
                             "the request may or may not have been processed")
            now = time.monotonic()
            for item in self._outbox:
                item.since = now
        return reason

    async def _write(self, call) -> None:
        while True:
            if not self._outbox:
                self._wake.clear()
                await self._wake.wait()
                continue
            item = self._outbox.popleft()
            if item.future.done():
                continue
            if item.deadline is not None:
                left = item.deadline - time.monotonic()
                if left <= 0:
                    item.future.set_exception(DeadlineExpiredError("deadline exceeded before the request reached the receiver"))
                    continue
                item.request.timeout_ms = max(1, int(left * 1000))
            # Counted as sent before the write: if the write fails we cannot know whether the item left.
            self._sent[item.id] = item
            await call.write(item.request)

    def _deliver(self, response: receiver_pb2.ClassifyStreamResponse) -> None:
        item = self._sent.pop(response.request_id, None)
        if item is None or item.future.done():
            return  # its caller gave up (deadline, cancel) before the answer came
        if response.HasField("result"):
            item.future.set_result(response.result)
            return
        code = _STATUS.get(response.error.code, grpc.StatusCode.UNKNOWN)
        if code == grpc.StatusCode.UNAVAILABLE and item.resends < self._max_resends:
            item.resends += 1  # not processed (receiver draining): safe to send again on the next stream
            item.since = time.monotonic()
            self._held.append(item)
            return
        item.future.set_exception(ServiceError(code, f"receiver: {response.error.message}", response.error.field))

    def _fail_stale(self) -> None:
        """While disconnected, fail the waiting items that have waited `wait_s` for a stream."""
        now = time.monotonic()
        stale = [i for i in list(self._outbox) + self._held if now - i.since >= self._wait_s]
        if stale:
            self._outbox = deque(i for i in self._outbox if i not in stale)
            self._held = [i for i in self._held if i not in stale]
            self._fail(stale, f"receiver {self.address} is unavailable ({self._last_error})")

    @staticmethod
    def _fail(items, message: str) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(unavailable(message))


class ReceiverPool:
    """`streams` ReceiverLinks to one receiver address; each request goes to the least-loaded connected one.

    One bidi stream is one RPC, pinned to one receiver. With several receiver replicas behind a DNS name
    (Kubernetes headless Service) and the round_robin policy every channel uses, each stream lands on a different
    replica, so `streams` ≥ replicas spreads this sender's load across all of them.
    """

    def __init__(self, address: str, client: ClientSettings, metrics: ServiceMetrics, *, streams: int = 1,
                 settle_s: float = 0.5, **kwargs):
        self.address = address
        self._client = client
        self._settle_s = settle_s
        self._channel: grpc.aio.Channel | None = None
        self.links = [ReceiverLink(address, client, metrics, **kwargs) for _ in range(streams)]

    @property
    def connected(self) -> bool:
        return any(link.connected for link in self.links)

    async def start(self) -> None:
        if len(self.links) == 1:
            await self.links[0].start()
            return
        # One channel for all streams: its round_robin policy then hands each new stream the next replica.
        # Give it a moment to connect to every resolved address first, or the early streams all land on the
        # one replica that happened to be READY first.
        self._channel = make_channel(self.address, self._client, with_token=False)
        self._channel.get_state(try_to_connect=True)
        await asyncio.sleep(self._settle_s)
        for link in self.links:
            await link.start(self._channel)

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self.links))
        if self._channel is not None:
            await self._channel.close()

    async def call(self, request: receiver_pb2.ClassifyStreamRequest, deadline: float | None) -> common_pb2.ClassifyResult:
        # Least in flight among connected links; if none is connected, any link queues the request until one is.
        link = min(self.links, key=lambda one: (not one.connected, len(one._sent) + len(one._outbox)))
        return await link.call(request, deadline)
