"""GET /healthz, /readyz and /metrics: for probes and scrapers, without an API key."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from telepathy.gateway import protocol
from telepathy.gateway.errors import error_body
from telepathy.gateway.routes.common import error_responses, service

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=protocol.HealthResponse, responses=error_responses(500))
async def healthz() -> protocol.HealthResponse:
    """Liveness: the gateway process answers. Says nothing about the services (see /readyz)."""
    return protocol.HealthResponse()


@router.get("/readyz", response_model=protocol.ReadyResponse, responses={
    **error_responses(500), 503: {"model": protocol.ErrorResponse, "description": "not ready: see services"}})
async def readyz(request: Request):
    """Readiness: 200 only when the sender and the receiver both report SERVING (grpc.health.v1) and the
    sender's stream to the receiver is connected."""
    ready, services, waiting = await service(request).readiness()
    if ready:
        return protocol.ReadyResponse(services=services)
    detail = ", ".join(f"{k} {v}" for k, v in services.items())
    doing = "".join(f"; {name} is {what}" for name, what in waiting.items())
    body = error_body(503, f"not ready: {detail}{doing}")
    body["services"] = services  # the envelope plus the per-service view, for humans reading the probe
    body["waiting"] = waiting  # what each service that is not ready yet is doing: loading, converting, warming up
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


@router.get("/metrics", response_class=Response, responses=error_responses(500))
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus exposition of this gateway's own registry."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
