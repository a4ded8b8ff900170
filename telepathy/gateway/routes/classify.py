"""POST /v1/classify (one path) and POST /v1/compare (both paths on the same text)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from telepathy.gateway import protocol
from telepathy.gateway.routes.common import V1_ERRORS, KeyedRoute, request_id, service

router = APIRouter(tags=["v1"], responses=V1_ERRORS, route_class=KeyedRoute)


@router.post("/v1/classify", response_model=protocol.ClassifyResponse)
async def classify(body: protocol.ClassifyRequest, request: Request) -> protocol.ClassifyResponse:
    """Classify `text` for `task` on one path."""
    return await service(request).classify(body, request_id(request))


@router.post("/v1/compare", response_model=protocol.CompareResponse)
async def compare(body: protocol.CompareRequest, request: Request) -> protocol.CompareResponse:
    """Run both paths on the same text, one after the other; report both results and the speed-up."""
    return await service(request).compare(body, request_id(request))
