"""FastAPI app factory: `build_app(settings)` wires routes, the error envelope, the request-id middleware and the
gRPC channels (opened in the lifespan, kept on `app.state`). No module-level state: two apps in one process
(as in the tests) share nothing.

    uvicorn.run(build_app(GatewaySettings.from_env()), host=..., port=...)   # or: telepathy gateway
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from telepathy.contract import VERSION

from telepathy.gateway import protocol
from telepathy.gateway.serving import (
    REQUEST_ID_HEADER,
    GatewayError,
    GatewayMetrics,
    GatewayService,
    ServiceClients,
    check_api_key,
    error_body,
    request_id_from,
    validation_error,
)
from telepathy.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

# Every error status a /v1 route can answer, documented once for OpenAPI.
_ERRORS = {code: {"model": protocol.ErrorResponse} for code in (401, 404, 413, 422, 429, 502, 503, 504)}


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

    # -- one error envelope ---------------------------------------------------------------------------------
    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.message, exc.param), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(list(exc.errors()))
        return JSONResponse(error_body(err.status, err.message, err.param), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    # -- auth: HTTPBearer/APIKeyHeader only parse (auto_error=False) and put an "Authorize" button on /docs; the
    #    decision is check_api_key's, which reads the raw header so that a non-Bearer scheme counts as missing. ----
    bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")
    api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")

    async def require_api_key(request: Request,
                              _bearer: Optional[HTTPAuthorizationCredentials] = Depends(bearer),
                              x_api_key: Optional[str] = Depends(api_key_header)) -> None:
        check_api_key(settings.api_keys, request.headers.get("authorization"), x_api_key)

    def service(request: Request) -> GatewayService:
        return request.app.state.service

    def request_id(request: Request) -> str:
        return request.state.request_id

    v1 = dict(dependencies=[Depends(require_api_key)], responses=_ERRORS)

    # -- routes: thin --------------------------------------------------------------------------------------------
    @app.post("/v1/classify", response_model=protocol.ClassifyResponse, tags=["v1"], **v1)
    async def classify(body: protocol.ClassifyRequest, request: Request) -> protocol.ClassifyResponse:
        """Classify `text` for `task` on one path."""
        return await service(request).classify(body, request_id(request))

    @app.post("/v1/compare", response_model=protocol.CompareResponse, tags=["v1"], **v1)
    async def compare(body: protocol.CompareRequest, request: Request) -> protocol.CompareResponse:
        """Run both paths on the same text, one after the other; report both results and the speed-up."""
        return await service(request).compare(body, request_id(request))

    @app.get("/v1/tasks", response_model=protocol.TasksResponse, tags=["v1"], **v1)
    async def tasks(request: Request) -> protocol.TasksResponse:
        """Tasks, their label names, and whether the sender has a bridge for each."""
        return await service(request).tasks()

    @app.get("/v1/info", response_model=protocol.InfoResponse, tags=["v1"], **v1)
    async def info(request: Request) -> protocol.InfoResponse:
        """The services behind the gateway: addresses, health, models and devices."""
        return await service(request).info()

    @app.get("/healthz", response_model=protocol.HealthResponse, tags=["ops"])
    async def healthz() -> protocol.HealthResponse:
        """Liveness: the gateway process answers. Says nothing about the services (see /readyz)."""
        return protocol.HealthResponse()

    @app.get("/readyz", response_model=protocol.ReadyResponse, tags=["ops"],
             responses={503: {"model": protocol.ErrorResponse}})
    async def readyz(request: Request):
        """Readiness: 200 only when the sender and the receiver both report SERVING (grpc.health.v1) and the
        sender's stream to the receiver is connected."""
        ready, services = await service(request).readiness()
        if ready:
            return protocol.ReadyResponse(services=services)
        detail = ", ".join(f"{k} {v}" for k, v in services.items())
        body = error_body(503, f"not ready: {detail}")
        body["services"] = services  # the envelope plus the per-service view, for humans reading the probe
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus exposition of this gateway's own registry."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
