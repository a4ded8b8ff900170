"""Run the gateway under a real uvicorn server in a background thread (tests, examples, notebooks).

    with GatewayThread(GatewaySettings(sender_addr=sender.address, port=0)) as gw:   # port 0 = pick a free one
        httpx.post(f"{gw.url}/v1/classify", json={"task": "sst2", "text": "…"})

The app (and its grpc.aio channels, created in the lifespan) lives on the thread's own event loop; the caller
talks to it over loopback HTTP like any client. rpc.harness.ServiceThread does the same for the gRPC services.
"""

from __future__ import annotations

import threading
import time

import uvicorn
from fastapi import FastAPI

from .app import build_app
from .settings import GatewaySettings


class GatewayThread:
    def __init__(self, settings: GatewaySettings, access_log: bool = False):
        self.settings = settings
        self.app: FastAPI = build_app(settings)
        config = uvicorn.Config(self.app, host=settings.host, port=settings.port, log_level="warning",
                                access_log=access_log, timeout_graceful_shutdown=settings.graceful_shutdown_s)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, daemon=True, name="gateway-uvicorn")
        self.port: int | None = None

    def start(self, timeout: float = 30.0) -> "GatewayThread":
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

    def __enter__(self) -> "GatewayThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
