"""DynamicBatcher: concurrent requests → batches for one model call, on asyncio.

Requests are grouped by a key (the bridge, the wire dtype, …: whatever must be equal within one model call).
The oldest waiting request decides what runs next, so keys are served in arrival order. A batch closes when it
holds `max_batch_size` requests of that key or when its oldest request has waited `max_queue_delay_s`,
whichever comes first. The queue is bounded: `submit` raises QueueFullError at once when `max_queue_size`
requests are waiting. Requests whose deadline passed or whose caller went away are dropped before the model
call, so expired work is never done.

`run_batch(key, items) -> results` runs in `executor` (one model thread per service: the model is not
re-entrant, and the event loop stays free for I/O). A result that is an Exception fails only its own request.

Long batches (generation) are bound with `stoppable=True`: they get a third argument, a threading.Event that is
set once every request of the batch is answered elsewhere — cancelled by its caller or past its deadline — so
the model can stop at its next step instead of holding the one model thread for work nobody will read.

Pipelining: `run_batch` may return a `Deferred` instead — its work is queued on the device and `wait()` gives the
results. The model thread hands it to `waiter` (another thread), which waits while the device works, and the
batcher meanwhile gathers and runs the next batch, with at most `max_in_flight` batches started and not yet
answered.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)
Item = TypeVar("Item")
R = TypeVar("R")


class Deferred:
    """A batch's results that are still being computed: `wait()` blocks until they are ready (off the model thread)."""

    def __init__(self, wait: Callable[[], list]):
        self.wait = wait


class QueueFullError(Exception):
    pass


class DeadlineExpiredError(Exception):
    pass


class BatcherClosedError(Exception):
    pass


@dataclass(frozen=True)
class BatchTiming:
    queue_s: float  # submit → start of the model call
    model_s: float  # the whole batch's model call
    batch_size: int


@dataclass(eq=False)  # identity: items may be tensors, whose == is elementwise
class _Entry:
    key: Hashable
    item: Any
    deadline: float | None  # time.monotonic() value
    enqueued: float
    future: asyncio.Future = field(repr=False)


class DynamicBatcher(Generic[Item, R]):
    def __init__(
        self,
        name: str,
        run_batch: Callable[[Hashable, list[Item]], list[R]] | None = None,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        executor: Executor,
        metrics=None,  # rpc.metrics.ServiceMetrics; optional so the batcher is usable alone
        waiter: Executor | None = None,  # where Deferred results are waited for (None: `executor`, no overlap)
        max_in_flight: int = 1,
        stoppable: bool = False,  # run_batch takes a third argument, the batch's "nobody waits" Event
        tracing=None,  # serving.tracing.Tracing: a queue and a model span per request when on
    ):
        self.name = name
        self._run_batch = run_batch
        self._stoppable = stoppable
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self._executor = executor
        self._waiter = waiter or executor
        self._max_in_flight = max_in_flight
        self._slots: asyncio.Semaphore | None = None
        self._finishing: set[asyncio.Task] = set()
        self._metrics = metrics
        self._tracing = tracing if tracing is not None and tracing.on else None
        self._pending: deque[_Entry] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._flushing = False  # draining: no batch-mates will come, so stop waiting for them

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def bind(self, run_batch: Callable[..., list[R]], *, stoppable: bool = False) -> None:
        """Set the batch function: a service builds its batchers (and hands them to its servicer) before the
        model that runs them has loaded. `stoppable`: run_batch(key, items, abandoned) where `abandoned` is a
        threading.Event set once no caller of the batch waits for it any more."""
        self._run_batch = run_batch
        self._stoppable = stoppable

    def start(self) -> None:
        """Start the worker on the running loop."""
        if self._run_batch is None:
            raise RuntimeError(f"{self.name}: no batch function bound (bind() it before start())")
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self._max_in_flight)
        self._task = asyncio.get_running_loop().create_task(self._work(), name=f"batcher-{self.name}")

    def flush(self) -> None:
        """Run what is queued without waiting for batch-mates (the service is draining; new work is refused)."""
        self._flushing = True
        if self._wakeup is not None:
            self._wakeup.set()

    async def close(self) -> None:
        """Refuse new requests, finish the queued ones, stop the worker."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            await self._task
        await asyncio.gather(*self._finishing)

    @property
    def depth(self) -> int:
        return len(self._pending)

    # ---- requests -------------------------------------------------------------------------------------------
    async def submit(self, item: Item, key: Hashable, deadline: float | None = None) -> tuple[R, BatchTiming]:
        """Queue one request and wait for its result; `deadline` is a time.monotonic() value."""
        if self._closing or self._task is None:
            raise BatcherClosedError(f"{self.name}: the service is shutting down")
        if len(self._pending) >= self.max_queue_size:
            self._count_skip("queue_full")
            raise QueueFullError(f"{self.name} queue is full ({self.max_queue_size} requests waiting); retry later")
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            self._count_skip("deadline")
            raise DeadlineExpiredError("deadline exceeded before the request was queued")
        loop = asyncio.get_running_loop()
        entry = _Entry(key, item, deadline, now, loop.create_future())
        self._pending.append(entry)
        self._set_depth()
        self._wakeup.set()
        timer = loop.call_later(deadline - now, self._expire, entry) if deadline is not None else None
        try:
            result = await entry.future  # cancelling the caller cancels this future too
            if self._tracing is not None:
                self._tracing.stage(self.name, now, result[1], batch_key=str(key))
            return result
        finally:
            if timer is not None:
                timer.cancel()
            if entry in self._pending:  # the caller went away (or its gRPC deadline passed) before its batch
                self._drop(entry, "cancelled")

    def _expire(self, entry: _Entry) -> None:
        """Deadline timer: answer now; if still queued, the request leaves the queue and never runs."""
        if entry.future.done():
            return
        queued = entry in self._pending
        if queued:
            self._drop(entry, "deadline")
        entry.future.set_exception(DeadlineExpiredError(
            "deadline exceeded while queued; the request was not run" if queued else "deadline exceeded during the model call"))

    def _drop(self, entry: _Entry, reason: str) -> None:
        self._pending.remove(entry)
        self._set_depth()
        self._count_skip(reason)
        self._wakeup.set()  # the worker may be waiting on batch-mates for this very entry

    # ---- worker ---------------------------------------------------------------------------------------------
    def _same_key(self, key: Hashable) -> int:
        return sum(1 for e in self._pending if e.key == key)

    async def _wait_for_batch(self, first: _Entry) -> None:
        close_at = first.enqueued + self.max_queue_delay_s
        while not (self._closing or self._flushing) and self._same_key(first.key) < self.max_batch_size:
            left = close_at - time.monotonic()
            if left <= 0 or first.future.done() or first not in self._pending:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except asyncio.TimeoutError:
                return

    def _take(self, key: Hashable) -> list[_Entry]:
        taken, kept = [], deque()
        for e in self._pending:
            (taken if e.key == key and len(taken) < self.max_batch_size else kept).append(e)
        self._pending = kept
        self._set_depth()
        return taken

    def _live(self, batch: list[_Entry]) -> list[_Entry]:
        now = time.monotonic()
        live = []
        for e in batch:
            if e.future.done():  # its caller went away just now (already out of the queue, so count it here)
                self._count_skip("cancelled")
                continue
            if e.deadline is not None and now >= e.deadline:
                self._count_skip("deadline")
                e.future.set_exception(DeadlineExpiredError("deadline exceeded while queued; the request was not run"))
            else:
                live.append(e)
        return live

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            first = self._pending[0]
            if first.future.done():  # its caller is gone and submit() has not cleaned up yet
                self._drop(first, "cancelled")
                continue
            await self._wait_for_batch(first)
            # At most max_in_flight batches started and not yet answered; the queue keeps filling meanwhile.
            await self._slots.acquire()
            if first not in self._pending:  # dropped while we waited: the next oldest sets its own delay
                self._slots.release()
                continue
            live = self._live(self._take(first.key))
            if not live:
                self._slots.release()
                continue
            started = time.monotonic()
            abandoned = self._watch_callers(live)
            try:
                results = await loop.run_in_executor(self._executor, self._call, first.key, [e.item for e in live],
                                                     abandoned)
            except Exception as exc:  # noqa: BLE001 - the batch fails, the worker lives on
                results = exc
            if isinstance(results, Future):  # queued on the device, the waiter waits for it: go on meanwhile
                task = loop.create_task(self._finish(live, results, started))
                self._finishing.add(task)
                task.add_done_callback(self._finishing.discard)
                continue
            self._slots.release()
            if abandoned.is_set():
                log.info("%s: a batch of %d stopped after %.2fs: every caller had gone (cancelled or past its "
                         "deadline)", self.name, len(live), time.monotonic() - started)
                if self._metrics is not None:
                    self._metrics.batches_stopped.labels(self.name).inc()
            self._deliver(live, results, started)

    def _watch_callers(self, live: list[_Entry]) -> threading.Event:
        """An Event set (from the loop) once every future of the batch is done: each caller was cancelled or its
        deadline timer answered it. Delivering results also completes the futures, but by then the batch is over."""
        abandoned = threading.Event()
        if not self._stoppable:
            return abandoned
        waiting = [len(live)]

        def one_gone(_future: asyncio.Future) -> None:
            waiting[0] -= 1
            if waiting[0] == 0:
                abandoned.set()

        for e in live:
            e.future.add_done_callback(one_gone)
        return abandoned

    def _call(self, key: Hashable, items: list, abandoned: threading.Event) -> Any:
        """On the model thread. A Deferred goes straight to the waiter, which starts waiting while the device works
        (so a lone request's answer is no later than if this thread had waited), and this thread is free at once."""
        results = self._run_batch(key, items, abandoned) if self._stoppable else self._run_batch(key, items)
        if isinstance(results, Deferred):
            return self._waiter.submit(results.wait)
        return results

    async def _finish(self, live: list[_Entry], waiting: Future, started: float) -> None:
        try:
            results = await asyncio.wrap_future(waiting)
        except Exception as exc:  # noqa: BLE001
            results = exc
        finally:
            self._slots.release()
        self._deliver(live, results, started)

    def _deliver(self, live: list[_Entry], results, started: float) -> None:
        if not isinstance(results, BaseException) and len(results) != len(live):
            results = RuntimeError(f"{self.name}: run_batch returned {len(results)} results for {len(live)} items")
        if isinstance(results, BaseException):
            log.error("%s: batch of %d failed", self.name, len(live), exc_info=results)
            results = [results] * len(live)
        model_s = time.monotonic() - started
        if self._metrics is not None:
            self._metrics.batch_size.labels(self.name).observe(len(live))
        for e, result in zip(live, results):
            if e.future.done():
                continue
            if isinstance(result, BaseException):
                e.future.set_exception(result)
            else:
                e.future.set_result((result, BatchTiming(started - e.enqueued, model_s, len(live))))

    # ---- metrics --------------------------------------------------------------------------------------------
    def _set_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.labels(self.name).set(len(self._pending))

    def _count_skip(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.skipped.labels(self.name, reason).inc()
