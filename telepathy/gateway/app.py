"""FastAPI app factory: `build_app(settings)` attaches the routes of each feature (routes/), the error envelope (errors.py), the request-id middleware and the
gRPC channels (opened in the lifespan, kept on `app.state`). No module-level state: two apps in one process
(as in the tests) share nothing.

    uvicorn.run(build_app(GatewaySettings.from_env()), host=..., port=...)   # or: telepathy gateway
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from telepathy.contract import VERSION
from telepathy.gateway.errors import error_body, install_error_handlers
from telepathy.gateway.routes import attach_routes
from telepathy.gateway.serving import REQUEST_ID_HEADER, GatewayMetrics, GatewayService, ServiceClients, request_id_from
from telepathy.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

class RequestContextMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware: it would buffer and copy every response).

    - gives every request an id (the client's sane X-Request-ID, else a new one) and puts it on every response;
    - refuses a body whose Content-Length is over the limit before anything reads it (413);
    - turns an unexpected exception into the 500 envelope *inside* this middleware, so even that response carries
      the request id (Starlette's ServerErrorMiddleware sits outside user middleware and would drop it);
    - counts responses per route template (never the raw path: unbounded label cardinality)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, max_body_bytes: int):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = request_id_from(headers.get("x-request-id"))
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > self.max_body_bytes:
                status = 413
                await _send_json(send_with_id, 413, error_body(
                    413, f"request body is {length} bytes; the limit is {self.max_body_bytes}"))
                return
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in %s %s (request %s)", scope.get("method"), scope.get("path"), request_id)
            if not started:
                await _send_json(send_with_id, 500, error_body(500, f"internal error (request id {request_id})"))
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.http_requests.labels(route, scope.get("method", ""), str(status)).inc()
            self.metrics.http_seconds.labels(route).observe(time.perf_counter() - start)


async def _send_json(send: Send, status: int, body: dict) -> None:
    response = JSONResponse(body, status_code=status)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def build_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings.from_env()
    metrics = GatewayMetrics()
    clients = ServiceClients(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # grpc.aio channels belong to the event loop that creates them: create them here, in uvicorn's loop.
        await clients.start()
        log.info("gateway → sender %s%s (max %d in flight, %.0f s per request)", settings.sender_addr,
                 f", receiver {settings.receiver_addr}" if settings.receiver_addr else "", settings.max_concurrency,
                 settings.request_timeout_s)
        try:
            yield
        finally:
            await clients.close()

    app = FastAPI(
        title="Telepathy gateway",
        version=VERSION,
        description="Classify text with two LLMs that talk through learned soft tokens (path=bridge) or through a "
                    "relay text (path=text). Errors: {\"error\": {\"type\", \"message\", \"param\"}}.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.clients = clients
    app.state.service = GatewayService(settings, clients, metrics)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes)

    install_error_handlers(app)
    attach_routes(app, settings)
    return app
