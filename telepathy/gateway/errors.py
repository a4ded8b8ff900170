"""The gateway's one error envelope: {"error": {"type", "message", "param"}} for every error response.

GatewayError is the only exception the gateway raises on purpose; failed gRPC calls map to it through
error_from_grpc (the status map below), request-validation errors through validation_error, and
install_error_handlers(app) renders all of them — and Starlette's own 404/405 — as the envelope.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from telepathy.contract import FIELD_TRAILER
from telepathy.gateway import protocol

log = logging.getLogger(__name__)


# HTTP status → envelope "type". Every error response of the gateway uses one of these.
ERROR_TYPES: dict[int, str] = {
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "request_timeout",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "overloaded_error",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}

# gRPC status of a failed sender call → HTTP status. Codes the services use on purpose (docs/SERVICES.md):
# INVALID_ARGUMENT bad input, NOT_FOUND unknown task/bridge, RESOURCE_EXHAUSTED queue full, UNAVAILABLE warming up
# or draining or down, DEADLINE_EXCEEDED the budget we gave it ran out.
GRPC_TO_HTTP: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 422,
    grpc.StatusCode.OUT_OF_RANGE: 422,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    # The sender cancels in-flight work when it drains for shutdown: transient, like UNAVAILABLE.
    grpc.StatusCode.CANCELLED: 503,
    grpc.StatusCode.ABORTED: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    # UNAUTHENTICATED / PERMISSION_DENIED: the sender rejected the *gateway's* service token or certificate. That is a
    # deployment error the HTTP client can neither cause nor fix, so it must not look like 401/403 (which would
    # send the client hunting for a wrong API key), and it is not transient either, so not 503 (which invites
    # retries that cannot succeed). 502 Bad Gateway: "the upstream refused us"; operators find details in the log.
    grpc.StatusCode.UNAUTHENTICATED: 502,
    grpc.StatusCode.PERMISSION_DENIED: 502,
    # FAILED_PRECONDITION: the services disagree with each other (e.g. the receiver has no bridge matching the
    # sender's fingerprint, or a model is not loaded). The request was fine; the deployment is not: 502.
    grpc.StatusCode.FAILED_PRECONDITION: 502,
    # INTERNAL / UNKNOWN / UNIMPLEMENTED / DATA_LOSS / ALREADY_EXISTS and anything new: fall through to 502.
}

# For these the upstream's message is about the client's own request, so it is passed on verbatim. For the rest
# (5xx) the client gets a fixed message: upstream details name internal addresses and belong in our log only.
_PASS_DETAILS = {422, 404, 429}

UPSTREAM_MESSAGES = {
    503: "the {service} service is unavailable; retry later",
    504: "deadline exceeded: the request did not finish within the gateway's budget",
    502: "the {service} service failed ({code}); see the gateway log for details",
}


class GatewayError(Exception):
    """An error with its HTTP status; rendered as {"error": {"type", "message", "param"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.type = ERROR_TYPES.get(status, "internal_error" if status >= 500 else "invalid_request_error")
        self.message = message
        self.param = param
        self.headers = dict(headers or {})


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "internal_error" if status >= 500 else "invalid_request_error")
    err = protocol.ErrorDetail(type=kind, message=_utf8_safe(message),
                               param=None if param is None else _utf8_safe(param))
    return protocol.ErrorResponse(error=err).model_dump()


def _utf8_safe(value: str) -> str:
    """Messages quote the client's input (an unknown field's name, say), which may hold a lone surrogate: written
    as the six ASCII characters \\ud800 instead, so that rendering the refusal cannot itself fail."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def error_from_grpc(exc: grpc.RpcError, service: str) -> GatewayError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    status = GRPC_TO_HTTP.get(code, 502)
    if status in _PASS_DETAILS:
        message = details or code.name.lower()
    else:
        message = UPSTREAM_MESSAGES.get(status, UPSTREAM_MESSAGES[502]).format(service=service, code=code.name)
    log.log(logging.WARNING if status >= 500 else logging.INFO, "%s call failed: %s %s → HTTP %d",
            service, code.name, details, status)
    param = _param_from_trailer(exc) if status in _PASS_DETAILS else None
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return GatewayError(status, message, param=param, headers=headers)


# Trailing-metadata key in which the services name the offending request field: telepathy.contract.FIELD_TRAILER.
# Service-side field → the HTTP request's field. A missing bridge is reported on bridge_id, but HTTP clients
# never send one: for them it is the task that has no bridge.
_FIELD_TO_PARAM = {"text": "text", "task": "task", "bridge_id": "task", "path": "path"}


def _param_from_trailer(exc: grpc.RpcError) -> str | None:
    try:
        trailer = exc.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - a call that never started has no trailers
        return None
    for key, value in trailer:
        if key == FIELD_TRAILER:
            return _FIELD_TO_PARAM.get(value if isinstance(value, str) else value.decode("latin-1"))
    return None


def validation_error(errors: list[dict[str, Any]]) -> GatewayError:
    """FastAPI/pydantic validation errors → one 422 naming the first offending field."""
    if not errors:
        return GatewayError(422, "invalid request body")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "json_invalid":
        return GatewayError(422, f"request body is not valid JSON: {first.get('ctx', {}).get('error', msg)}")
    if first.get("type") == "string_unicode":  # pydantic's own refusal of a lone surrogate, e.g. in a field name
        lone = next((f" (U+{ord(c):04X})" for c in str(first.get("input", "")) if 0xD800 <= ord(c) <= 0xDFFF), "")
        where = f"{param}: " if param else "a field name "
        return GatewayError(422, f"{where}contains a lone surrogate{lone} that UTF-8 cannot encode", param=param)
    if param is None:  # the body as a whole: absent, or JSON that is not an object
        if first.get("type") == "missing":
            return GatewayError(422, "request body is empty; expected a JSON object with text and task")
        kind = _JSON_KINDS.get(type(first.get("input")), "not an object")
        return GatewayError(422, f"request body must be a JSON object with text and task, got {kind}")
    if first.get("type") == "missing":
        return GatewayError(422, f"{param}: field required", param=param)
    if first.get("type") == "extra_forbidden":
        return GatewayError(422, f"{param}: unknown field", param=param)
    msg = msg.removeprefix("Value error, ")
    return GatewayError(422, f"{param}: {msg}" if param else msg, param=param)


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def install_error_handlers(app: FastAPI) -> None:
    """Render GatewayError, request-validation errors and Starlette's HTTP errors as the one envelope."""

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.message, exc.param), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(list(exc.errors()))
        return JSONResponse(error_body(err.status, err.message, err.param), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            allowed = (headers or {}).get("Allow", "")
            message = f"method {request.method} is not allowed on {request.url.path}; allowed: {allowed}"
        else:
            message = str(exc.detail)
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code, headers=headers)
