"""FastAPI app factory: `build_app(settings)` attaches the routes of each feature (routes/), the error envelope
(errors.py), the request's edge (edge.py: request ids, API key, body limits) and the gRPC channels (opened in the
lifespan, kept on `app.state`). No module-level state: two apps in one process (as in the tests) share nothing.

    uvicorn.run(build_app(GatewaySettings.from_env()), host=..., port=...)   # or: telepathy gateway
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from telepathy.contract import VERSION
from telepathy.gateway.edge import RequestContextMiddleware
from telepathy.gateway.errors import install_error_handlers
from telepathy.gateway.routes import attach_routes
from telepathy.gateway.serving import GatewayMetrics, GatewayService, ServiceClients
from telepathy.gateway.settings import GatewaySettings
from telepathy.serving.tracing import Tracing
from telepathy.serving.tracing import shutdown as shutdown_tracing
from telepathy.serving.tracing import tracer_provider as tracer_provider_for

log = logging.getLogger(__name__)


def build_app(settings: GatewaySettings | None = None, tracer_provider=None) -> FastAPI:
    """`tracer_provider` overrides the one settings.tracing builds (None when off; serving/tracing.py)."""
    settings = settings or GatewaySettings.from_env()
    metrics = GatewayMetrics()
    own_provider = tracer_provider is None  # flushed and shut down with the app; a handed-in one is not
    if tracer_provider is None:
        tracer_provider = tracer_provider_for(settings.tracing, settings.otlp_endpoint, "gateway")
    tracing = Tracing(tracer_provider, "telepathy.gateway")
    clients = ServiceClients(settings, tracing)

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
            if own_provider:
                shutdown_tracing(tracer_provider)

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
    app.add_middleware(RequestContextMiddleware, metrics=metrics, settings=settings, routes=app.router.routes)

    install_error_handlers(app)
    attach_routes(app, settings)
    if tracing.on:  # the HTTP server span of each request, outermost (W3C traceparent from the caller honoured)
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app, tracer_provider=tracer_provider, exclude_spans=["receive", "send"],
                                           excluded_urls="healthz,readyz,metrics")
    return app
