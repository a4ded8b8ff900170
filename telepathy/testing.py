"""The one harness for tests, examples and benchmarks: free ports, tiny untrained bridges, a service or the
gateway in a background thread, and waiting for remote services.

    with ServiceThread(lambda: build_receiver(settings, lm)) as receiver:   # own event loop, own thread
        channel = make_sync_channel(receiver.address)

The factory runs on the service's loop thread because grpc.aio objects belong to the loop they are made on.
`make_untrained_bridges` saves random-init bridges for a model pair: enough to exercise every code path
(the answers are meaningless) when no trained checkpoint is at hand.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from telepathy.serving.channels import ClientSettings, make_sync_channel

if TYPE_CHECKING:
    from telepathy.gateway.settings import GatewaySettings


def free_port() -> int:
    """A TCP port free on loopback right now (for a service started next, in this process or another)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServiceThread:
    def __init__(self, factory: Callable[[], object], name: str = "service"):
        self._factory = factory
        self.service = None
        self.port: int | None = None
        self._starting = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=f"{name}-loop")

    async def _create(self):
        return self._factory()

    def start(self, timeout: float = 300.0, wait: bool = True) -> ServiceThread:
        """Build the service on the loop and start it; wait=False returns as soon as start() is under way."""
        self._thread.start()
        self.service = self.call(self._create(), timeout)
        self._starting = asyncio.run_coroutine_threadsafe(self.service.start(), self._loop)
        if wait:
            self.wait_started(timeout)
        return self

    def wait_started(self, timeout: float = 300.0) -> int:
        self.port = self._starting.result(timeout)
        return self.port

    @property
    def address(self) -> str:
        return self.service.address

    def call(self, coro, timeout: float = 60.0):
        """Run a coroutine on the service's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, grace: float | None = None, timeout: float = 120.0) -> None:
        started = self.service is not None and self._starting.done() and self._starting.exception() is None
        if started and self._thread.is_alive():
            self.call(self.service.stop(grace), timeout)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> ServiceThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until_serving(address: str, settings: ClientSettings | None = None, timeout: float = 120.0,
                       alive: Callable[[], bool] | None = None) -> None:
    """Poll grpc.health.v1 until `address` says SERVING; `alive()` False aborts early (a crashed subprocess)."""
    end = time.monotonic() + timeout
    channel = make_sync_channel(address, settings)
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        while time.monotonic() < end:
            if alive is not None and not alive():
                raise RuntimeError(f"the service at {address} exited before it was serving")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{address} was not SERVING within {timeout:.0f}s")
    finally:
        channel.close()


def make_untrained_bridges(root: str | Path, sender, receiver, tasks=None, **config) -> Path:
    """One random-init bridge per task for the (sender, receiver) LanguageModels, saved as real checkpoints under
    root/<task>. `tasks`: built-in task names or TaskSpecs (default: every built-in task)."""
    import torch

    from telepathy.bridge.checkpoint import save_bridge
    from telepathy.bridge.resampler import Bridge, BridgeConfig
    from telepathy.bridge.tasks import TASKS, get_task

    root = Path(root)
    config = {"sender_layer": max(1, sender.num_layers // 2), "num_latents": 4, "d_model": 32, "depth": 1,
              "num_heads": 4, "d_wire": 16, **config}
    for i, task in enumerate(tasks or TASKS):
        spec = get_task(task) if isinstance(task, str) else task
        torch.manual_seed(1000 + i)
        cfg = BridgeConfig(sender_hidden=sender.hidden_size, receiver_hidden=receiver.hidden_size, **config)
        bridge = Bridge(cfg, target_rms=receiver.embedding_rms_median())
        save_bridge(root / spec.name, bridge, spec, sender.fingerprint(), receiver.fingerprint(), training={"steps": 0})
    return root


class GatewayThread:
    """The gateway under a real uvicorn server in a background thread; the caller talks to it over loopback HTTP.

        with GatewayThread(GatewaySettings(sender_addr=sender.address, port=0)) as gw:   # port 0 = a free one
            httpx.post(f"{gw.url}/v1/classify", json={"task": "sst2", "text": "…"})

    The app (and its grpc.aio channels, created in the lifespan) lives on the thread's own event loop.
    """

    def __init__(self, settings: GatewaySettings, access_log: bool = False, tracer_provider=None):
        import uvicorn  # the gateway extra; the service harness above works without it

        from telepathy.gateway.app import build_app

        self.settings = settings
        self.app = build_app(settings, tracer_provider)
        config = uvicorn.Config(self.app, host=settings.host, port=settings.port, log_level="warning",
                                access_log=access_log, timeout_graceful_shutdown=settings.graceful_shutdown_s)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, daemon=True, name="gateway-uvicorn")
        self.port: int | None = None

    def start(self, timeout: float = 30.0) -> GatewayThread:
        if self.port is not None:  # already started (e.g. `with GatewayThread(...).start() as gw:`)
            return self
        self._thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the gateway's uvicorn server exited during start-up (port taken?)")
            if time.monotonic() > end:
                raise TimeoutError(f"gateway did not start within {timeout:.0f}s")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]  # the real one when settings.port == 0
        return self

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> GatewayThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
