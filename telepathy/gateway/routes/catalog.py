"""GET /v1/tasks and GET /v1/info: what the deployment can do and what runs behind it."""

from __future__ import annotations

from fastapi import APIRouter, Request

from telepathy.gateway import protocol
from telepathy.gateway.routes.common import CATALOG_ERRORS, KeyedRoute, error_responses, service

router = APIRouter(tags=["v1"], responses=CATALOG_ERRORS, route_class=KeyedRoute)


@router.get("/v1/tasks", response_model=protocol.TasksResponse, responses=error_responses(502, 503, 504))
async def tasks(request: Request) -> protocol.TasksResponse:
    """The tasks the sender serves (built-ins and its bridges' tasks), their label names, and whether it has a
    bridge for each. Asked of the sender each time: 503 while it is down or loading."""
    return await service(request).tasks()


@router.get("/v1/info", response_model=protocol.InfoResponse)
async def info(request: Request) -> protocol.InfoResponse:
    """The services behind the gateway: addresses, health, models and devices."""
    return await service(request).info()
