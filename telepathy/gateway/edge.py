"""The request's edge: what happens before a route sees it (RequestContextMiddleware, pure ASGI).

In this order, each refusal in the one error envelope and nothing read that the refusal does not need:

    route match (template for metrics) → API key (401) → announced body size (413) → no body (422)
    → Content-Type (415) → the body, counted while it streams in (413) and bounded in time (408)
    → UTF-8 (422) → nesting depth (422) → the app (FastAPI parses the JSON, pydantic validates the fields)

The key is checked before any body byte is read and the size while it arrives, so neither a client without a key
nor one streaming an endless chunked body costs more than its headers and `max_body_bytes`. A response sent while
the client still owes body bytes closes the connection: the unread rest must not be parsed as a next request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from telepathy.gateway.errors import GatewayError, error_body
from telepathy.gateway.serving import REQUEST_ID_HEADER, GatewayMetrics, check_api_key, request_id_from
from telepathy.gateway.settings import GatewaySettings
from telepathy.serving.logs import REQUEST_ID

try:
    from fastapi.routing import iter_route_contexts
except ImportError:  # FastAPI before lazily included routers: app.routes already holds every route itself
    def iter_route_contexts(routes: Iterable[BaseRoute]) -> Iterator[Any]:
        return iter(routes)

log = logging.getLogger(__name__)

# A request is one flat JSON object, so any real one is 1 deep. The limit is explicit (not Python's recursion
# limit, which the JSON parser hits as an unhandled RecursionError) and far above anything legitimate.
MAX_JSON_DEPTH = 32
EMPTY_BODY = "request body is empty; expected a JSON object with text and task"

# JSON strings (unrolled so that an unterminated one cannot backtrack) and the brackets left outside them.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


class _Route:
    """One route as the edge sees it: its template, how to match it, and what it asks of a request."""

    def __init__(self, context: Any):
        original = getattr(context, "original_route", context)
        self.matches = context.matches
        self.template: str = getattr(context, "path_format", None) or context.path
        self.requires_api_key: bool = getattr(original, "requires_api_key", False)
        self.takes_json_body: bool = getattr(original, "body_field", None) is not None


def _routes(routes: Iterable[BaseRoute]) -> list[_Route]:
    return [_Route(c) for c in iter_route_contexts(list(routes))]


def match_route(routes: list[_Route], scope: Scope) -> tuple[_Route | None, bool]:
    """The route for this request and whether it matched in full (False: right path, wrong method → 405)."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route, True
        if match is Match.PARTIAL and partial is None:
            partial = route
    return partial, False


def check_content_type(value: str | None) -> None:
    media = (value or "").partition(";")[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    raise GatewayError(415, f"expected Content-Type: application/json, got {media[:100] or 'none'}")


def check_json_text(body: bytes) -> None:
    """UTF-8 and nesting, the two ways a body can break the JSON parser itself rather than fail as JSON."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GatewayError(422, f"request body is not valid UTF-8 (byte 0x{body[exc.start]:02x} at offset "
                                f"{exc.start})") from None
    depth = 0
    for bracket in _BRACKET.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if bracket.group() in "[{" else -1
        if depth > MAX_JSON_DEPTH:  # stop at once: the rest cannot make it acceptable
            raise GatewayError(422, f"request body is nested too deeply: more than {MAX_JSON_DEPTH} levels of "
                                    "arrays/objects (a request is one flat JSON object)")


def _announced(headers: Headers) -> int | None:
    """Content-Length when given (uvicorn has already refused a malformed one); None: chunked or no body."""
    length = headers.get("content-length")
    return int(length) if length is not None and length.isdigit() else None


class _Body:
    """The request body as it streams in: counted against the cap, bounded in time, then replayed to the app."""

    def __init__(self, headers: Headers, settings: GatewaySettings):
        self.announced = _announced(headers)
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self.pending = self.chunked or bool(self.announced)  # the client still owes body bytes
        self.limit = settings.max_body_bytes
        self.timeout = settings.body_timeout_s
        self.received = 0

    async def read(self, receive: Receive) -> bytes | None:
        """The whole body, or None when the client went away before sending it."""
        deadline = time.monotonic() + self.timeout
        chunks: list[bytes] = []
        while self.pending:
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                of = f" of {self.announced}" if self.announced is not None else ""
                raise GatewayError(408, f"request body not received in full within {self.timeout:g} s; "
                                        f"{self.received}{of} bytes arrived") from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            self.received += len(chunk)
            if self.received > self.limit:
                raise GatewayError(413, f"request body is more than {self.limit} bytes; the limit is {self.limit}")
            chunks.append(chunk)
            self.pending = message.get("more_body", False)
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    done = False

    async def replay() -> Message:
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the server's own messages (http.disconnect)

    return replay


class RequestContextMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware: it would buffer and copy every response).

    - gives every request an id (the client's sane X-Request-ID, else a new one) and puts it on every response;
    - admits the request (module docstring): key, size, type and encoding of the body, before any route runs;
    - turns an unexpected exception into the 500 envelope *inside* this middleware, so even that response carries
      the request id (Starlette's ServerErrorMiddleware sits outside user middleware and would drop it);
    - counts responses per route template (never the raw path: unbounded label cardinality), refusals made here
      included; "unmatched" is a request no route matches (a 404)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, settings: GatewaySettings,
                 routes: Iterable[BaseRoute]):
        self.app = app
        self.metrics = metrics
        self.settings = settings
        self._all_routes = routes  # the app's live list: routes are attached after the middleware is added
        self._routes: list[_Route] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._routes is None:
            self._routes = _routes(self._all_routes)
        headers = Headers(scope=scope)
        request_id = request_id_from(headers.get("x-request-id"))
        scope.setdefault("state", {})["request_id"] = request_id
        REQUEST_ID.set(request_id)  # log lines of this request carry it (serving/logs.py, log_format json)
        route, full = match_route(self._routes, scope)
        body = _Body(headers, self.settings)
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                response_headers = MutableHeaders(scope=message)
                response_headers[REQUEST_ID_HEADER] = request_id
                if body.pending:
                    response_headers["Connection"] = "close"
            await send(message)

        try:
            try:
                admitted = await self._admit(route if full else None, headers, body, receive)
            except GatewayError as err:
                await _send_json(send_with_id, err.status, error_body(err.status, err.message, err.param), err.headers)
                return
            if admitted is None:
                status = 499  # the client went away before its body arrived: nobody to answer
                return
            await self.app(scope, admitted, send_with_id)
        except Exception:
            log.exception("unhandled error in %s %s (request %s)", scope.get("method"), scope.get("path"), request_id)
            if not started:
                await _send_json(send_with_id, 500, error_body(500, f"internal error (request id {request_id})"))
        finally:
            label = route.template if route is not None else "unmatched"
            self.metrics.http_requests.labels(label, scope.get("method", ""), str(status)).inc()
            self.metrics.http_seconds.labels(label).observe(time.perf_counter() - start)

    async def _admit(self, route: _Route | None, headers: Headers, body: _Body, receive: Receive) -> Receive | None:
        """The receive to hand the app (the body read and checked, for routes that take one), or None when the
        client disconnected; raises GatewayError to refuse. Routes without a body never have it read."""
        if route is not None and route.requires_api_key:
            check_api_key(self.settings.api_keys, headers.get("authorization"), headers.get("x-api-key"))
        if route is None or not route.takes_json_body:
            return receive
        if body.announced is not None and body.announced > body.limit:
            raise GatewayError(413, f"request body is {body.announced} bytes; the limit is {body.limit}")
        if not body.pending:
            raise GatewayError(422, EMPTY_BODY)
        check_content_type(headers.get("content-type"))
        raw = await body.read(receive)
        if raw is None:
            return None
        if not raw:
            raise GatewayError(422, EMPTY_BODY)
        check_json_text(raw)
        return _replay(raw, receive)


async def _send_json(send: Send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    response = JSONResponse(body, status_code=status, headers=headers)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
