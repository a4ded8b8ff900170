"""The life cycle both services share: bind → load → warm up → SERVING → drain → stop; and model loading.

    start():  bind the port (health NOT_SERVING), load the model and bridges on the model thread, start the
              batchers, run one max-size batch through the model (so the first real request does not pay for
              lazy init / allocator growth), then SERVING.
    stop():   health NOT_SERVING for good, refuse new work with UNAVAILABLE, let in-flight requests finish
              (at most `grace_s`), then stop batchers and the model thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.runtime.engine import BridgeSet, load_bridge_set
from telepathy.bridge.tasks import load_task_file
from telepathy.config import ServiceSettings
from telepathy.serving import tracing
from telepathy.serving.batcher import DynamicBatcher
from telepathy.serving.convert import VERSION
from telepathy.serving.errors import unavailable
from telepathy.serving.metrics import ServiceMetrics
from telepathy.serving.server import GrpcServer

log = logging.getLogger(__name__)
WARMUP_PHASE = "warming up (a first batch through every bridge and the text path; on CUDA every batch size)"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return device


def load_lm(settings: ServiceSettings) -> LanguageModel:
    device = resolve_device(settings.device)
    dtype = None if settings.dtype == "auto" else _DTYPES[settings.dtype]
    started = time.monotonic()
    lm = LanguageModel.load(settings.model, device=device, dtype=dtype)
    log.info("loaded %s on %s (%s) in %.1fs", lm.spec, lm.device, lm.dtype, time.monotonic() - started)
    return lm


class ServiceState:
    """What the servicer checks before taking work, and what the service is doing, in words (`phase`): the
    UNAVAILABLE messages and Info.state say it, so a probe or a person waiting on start-up knows what for."""

    def __init__(self, name: str):
        self.name = name
        self.loaded = False  # model and bridges in memory (Info / ListBridges answer)
        self.ready = False  # warmed up (inference answers)
        self.draining = False
        self.phase = "starting"  # set by BaseService.start / load_side as start-up goes on

    def describe(self) -> str:
        if self.draining:
            return "shutting down"
        return "serving" if self.ready else self.phase

    def check(self, need_ready: bool = True) -> None:
        if self.draining:
            raise unavailable(f"{self.name} is shutting down; retry on another instance")
        if not self.loaded or (need_ready and not self.ready):
            raise unavailable(f"{self.name} is {self.phase}; retry shortly")


class EngineSlot:
    """Where a servicer finds its side's engine (bridges, model info). Servicers are built, and the port bound,
    before the model loads; the service fills the slot on the model thread once loading is done, and
    ServiceState.check() refuses calls until then."""

    def __init__(self, name: str):
        self.name = name
        self._engine = None

    def fill(self, engine) -> None:
        self._engine = engine

    @property
    def engine(self):
        if self._engine is None:
            raise unavailable(f"{self.name} is loading its model; retry shortly")
        return self._engine


def loading_phase(spec: str) -> str:
    """What loading `spec` will do, in words: an embedded model not converted yet is converted first (once)."""
    from telepathy.bridge import embedded

    if spec in embedded.EMBEDDED_PRESETS and not embedded.preset_status(spec)["converted"]:
        return f"converting the embedded model {spec} from GGUF (first run only; a minute or two on a CPU)"
    return f"loading its model ({spec})"


def load_side(settings: ServiceSettings, half: str, lm: LanguageModel | None = None,
              state: ServiceState | None = None) -> tuple[LanguageModel, BridgeSet]:
    """The model of `settings` (or `lm`, already loaded) and the `half` ("sender" or "receiver") of every bridge
    under settings.bridges that fits it, with the tasks of settings.task_files in its catalog; `state.phase`
    follows along. Runs on the model thread. A bad task file is a TaskFileError (one line), a task that differs
    from another of its name a TaskConflictError: the service does not start."""
    files = [load_task_file(path) for path in settings.task_files]  # before the model: a bad file fails at once
    if lm is None:
        if state is not None:
            state.phase = loading_phase(settings.model)
        lm = load_lm(settings)
    if state is not None:
        state.phase = f"loading the {half} bridges from {settings.bridges}"
    if half == "receiver":  # it scores the verbalizers' first tokens: they must differ for its tokenizer
        for task in files:
            task.check_verbalizers(lm.tokenizer, lm.spec)
    bridges = load_bridge_set(settings.bridges, lm, half, lm.device,
                              [(task.spec, f"the task file {task.source}") for task in files])
    log.info("%s bridges from %s: %s; tasks: %s", half, settings.bridges,
             sorted(bridges.by_id) or "none (the bridge path answers NOT_FOUND)", ", ".join(bridges.tasks))
    return lm, bridges


class BaseService:
    """One gRPC server, its model thread, metrics, state and batchers, and the life cycle around them.

    A role subclasses it: sets `name` and `service_name`, builds its batchers (`self.batcher(name)`) and servicers
    in __init__ (handing each servicer what it calls), and implements load() — load the model(s), build the
    runtime, bind the batchers' batch functions, fill the servicers' EngineSlots; returns the model spec for the
    metrics — and warmup(). Both run on the model thread. The async hooks after_load / begin_drain / after_stop
    run on the event loop at those points of start() and stop().
    """

    name = "service"
    service_name = ""

    def __init__(self, settings: ServiceSettings, tracer_provider=None):
        self.settings = settings
        self.metrics = ServiceMetrics(self.name, VERSION)
        # tracer_provider: one handed in (tests, an embedding app), else one from the settings (None when off)
        self._own_provider = tracer_provider is None  # flushed and shut down by stop(); a handed-in one is not
        if tracer_provider is None:
            tracer_provider = tracing.tracer_provider(settings.tracing, settings.otlp_endpoint, self.name)
        self.tracing = tracing.Tracing(tracer_provider, f"telepathy.{self.name}")
        self.grpc = GrpcServer(settings, self.service_names(), self.metrics, self.tracing)
        self.state = ServiceState(self.name)
        # One model thread: the model and tokenizer are not re-entrant, and the event loop stays free for I/O.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-model")
        # Waits for batches queued on the device (batcher.Deferred), so the model thread can queue the next one.
        self.waiter = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-wait")
        self.batchers: list[DynamicBatcher] = []

    def service_names(self) -> list[str]:
        """The gRPC services this server answers for (health and reflection list them)."""
        return [self.service_name]

    def batcher(self, name: str, settings: ServiceSettings | None = None) -> DynamicBatcher:
        """A batcher on this service's model thread, sized by `settings` (default: the service's); load() binds
        its batch function."""
        s = settings or self.settings
        b = DynamicBatcher(name, max_batch_size=s.max_batch_size, max_queue_delay_s=s.max_queue_delay_s,
                           max_queue_size=s.max_queue_size, executor=self.executor, metrics=self.metrics,
                           waiter=self.waiter, max_in_flight=s.max_batches_in_flight, tracing=self.tracing)
        self.batchers.append(b)
        return b

    @property
    def port(self) -> int | None:
        return self.grpc.port

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "") else "[::1]" if self.settings.host == "::" else self.settings.host
        return f"{host}:{self.port}"

    def load(self) -> str:
        """Load models and bridges, build the runtime, bind the batchers; → the model spec. Model thread."""
        raise NotImplementedError

    def warmup(self) -> None:
        """Run max-size batches through everything loaded, so the first request pays no lazy set-up. Model thread."""
        raise NotImplementedError

    async def after_load(self) -> None:
        """Hook: the sender connects to its receiver here."""

    async def begin_drain(self) -> None:
        """Hook: the receiver ends its open streams here, once their in-flight items are answered."""

    async def after_stop(self) -> None:
        """Hook: the sender closes its receiver stream here."""

    async def start(self) -> int:
        """Bind (health NOT_SERVING), load, warm up, then SERVING. On failure the port is released."""
        port = await self.grpc.start()
        self.state.phase = loading_phase(self.settings.model)  # until load() says more
        try:
            if self.settings.metrics_port:
                self.metrics.serve_http(self.settings.host, self.settings.metrics_port)
            loop = asyncio.get_running_loop()
            # On a CPU, load and warm up on one thread, then serve on all. Services started together share the
            # cores, and OpenMP threads spin while they wait: on 2 cores the sender's warm-up took 15–16 s beside a
            # loading receiver instead of 0.8 s, and `telepathy up` was ready after 23 s instead of 15 s
            # (tools/bench_cold_start.py). Requests run on every thread again, as fast as before.
            threads = torch.get_num_threads()
            if resolve_device(self.settings.device) == "cpu":
                await loop.run_in_executor(self.executor, torch.set_num_threads, 1)
            self.metrics.set_model(await loop.run_in_executor(self.executor, self.load))
            self.state.loaded = True
            for b in self.batchers:
                b.start()
            await self.after_load()
            if self.settings.warmup:
                started = time.monotonic()
                self.state.phase = WARMUP_PHASE
                await loop.run_in_executor(self.executor, self.warmup)
                log.info("%s warm-up took %.2fs", self.name, time.monotonic() - started)
        except BaseException:
            await self.grpc.server.stop(0)
            self.executor.shutdown(wait=False)
            self.waiter.shutdown(wait=False)
            self.metrics.stop_http()
            raise
        await loop.run_in_executor(self.executor, torch.set_num_threads, threads)  # the model thread's own setting
        self.state.ready = True
        await self.grpc.set_serving(True)
        log.info("%s serving on %s (security: %s)", self.name, self.address, self.settings.security)
        return port

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new work, finish in-flight work (at most `grace` s), then stop."""
        grace = self.settings.grace_s if grace is None else grace
        log.info("%s draining (grace %.1fs)", self.name, grace)
        self.state.draining = True
        for b in self.batchers:
            b.flush()
        await self.grpc.enter_drain()
        await self.begin_drain()
        await self.grpc.server.stop(grace)
        await self.after_stop()
        for b in self.batchers:
            await b.close()
        self.executor.shutdown(wait=True)
        self.waiter.shutdown(wait=True)
        self.metrics.stop_http()
        if self._own_provider:
            tracing.shutdown(self.tracing.provider)
        log.info("%s stopped", self.name)


def deadline_from(context) -> float | None:
    """The caller's gRPC deadline as a time.monotonic() value (None when it set none)."""
    left = context.time_remaining()
    return None if left is None else time.monotonic() + left
