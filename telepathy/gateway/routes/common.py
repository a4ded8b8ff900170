"""What the routes share: the API-key check as a dependency, the request's service and id, the error docs."""

from __future__ import annotations

from fastapi import Depends, Request
from fastapi.params import Depends as DependsMarker
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from telepathy.gateway import protocol
from telepathy.gateway.serving import GatewayService, check_api_key
from telepathy.gateway.settings import GatewaySettings

# Every error status a /v1 route can answer, documented once for OpenAPI.
V1_ERRORS = {code: {"model": protocol.ErrorResponse} for code in (401, 404, 413, 422, 429, 502, 503, 504)}


def api_key_dependency(settings: GatewaySettings) -> DependsMarker:
    """HTTPBearer/APIKeyHeader only parse (auto_error=False) and put an "Authorize" button on /docs; the decision is
    check_api_key's, which reads the raw header so that a non-Bearer scheme counts as missing."""
    bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")
    api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")

    async def require_api_key(request: Request,
                              _bearer: HTTPAuthorizationCredentials | None = Depends(bearer),
                              x_api_key: str | None = Depends(api_key_header)) -> None:
        check_api_key(settings.api_keys, request.headers.get("authorization"), x_api_key)

    return Depends(require_api_key)


def service(request: Request) -> GatewayService:
    return request.app.state.service


def request_id(request: Request) -> str:
    return request.state.request_id
