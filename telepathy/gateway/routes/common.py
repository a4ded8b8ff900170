"""What the routes share: the keyed-route marker, the API-key docs, the request's service and id, the error docs."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Request
from fastapi.params import Depends as DependsMarker
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPBearer

from telepathy.gateway import protocol
from telepathy.gateway.serving import GatewayService

# Why each error status happens, as OpenAPI shows it; docs/GATEWAY.md has the full table (and a test holds the
# two to the same statuses per endpoint).
ERROR_DOCS: dict[int, str] = {
    401: "API keys are configured and the request's key is missing or wrong",
    404: "unknown task, or no bridge for the task on the bridge path",
    408: "the request body did not arrive in full within body_timeout_s",
    413: "the body is over max_body_bytes, or text over max_text_chars",
    415: "Content-Type is not application/json",
    422: "the body is not a valid request (empty, not UTF-8, too deeply nested, not JSON, a field missing, "
         "unknown or invalid), or the sender rejected the input",
    429: "max_concurrency requests already in flight, or the sender's queue is full",
    500: "a bug in the gateway (logged with the request id)",
    502: "the sender refused the gateway's credentials, the services disagree, or a service failed",
    503: "a service is down, warming up or draining",
    504: "the request's budget (request_timeout_s) ran out",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": protocol.ErrorResponse, "description": ERROR_DOCS[code]} for code in statuses}


# Every error status a /v1 route can answer, for OpenAPI: the two that take a body, and the two that do not.
V1_ERRORS = error_responses(401, 404, 408, 413, 415, 422, 429, 500, 502, 503, 504)
CATALOG_ERRORS = error_responses(401, 500)


class KeyedRoute(APIRoute):
    """A route behind the API key. The key is checked at the request's edge (gateway/edge.py), before any byte of
    the body is read: a FastAPI dependency would only run after the body has been read and parsed."""

    requires_api_key = True


def api_key_docs() -> list[DependsMarker]:
    """HTTPBearer/APIKeyHeader only parse (auto_error=False): they put the schemes and an "Authorize" button on
    /docs. The decision is the edge's (serving.check_api_key), made before the route runs."""
    bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")
    api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")
    return [Depends(bearer), Depends(api_key_header)]


def service(request: Request) -> GatewayService:
    return request.app.state.service


def request_id(request: Request) -> str:
    return request.state.request_id
