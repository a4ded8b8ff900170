"""HTTP clients for the gateway (httpx, blocking and asyncio; no FastAPI needed on the client side).

    from telepathy.client import GatewayClient, AsyncGatewayClient, GatewayError

    with GatewayClient("http://127.0.0.1:8000", api_key=None) as gw:
        r = gw.classify("a gripping film", task="sst2")          # the JSON of POST /v1/classify, as a dict
        r["label"], r["scores"], r["timings_ms"]["total"]

    async with AsyncGatewayClient("http://127.0.0.1:8000") as gw:
        tasks = await gw.tasks()                                 # GET /v1/tasks ["tasks"]

Every error response (the gateway's one envelope) raises GatewayError: .status (HTTP), .type, .message, .param
(the request field, when there is one), .request_id (X-Request-ID). Each method is written once (_GatewayCalls);
the async client returns an awaitable of the same result. No retries: POST /v1/classify runs a Relay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx

T = TypeVar("T")
Json = dict[str, Any]


class GatewayError(Exception):
    """An error answer of the gateway: {"error": {"type", "message", "param"}}."""

    def __init__(self, status: int, type_: str, message: str, param: str | None = None, request_id: str = ""):
        super().__init__(f"{status} {type_}: {message}")
        self.status, self.type, self.message, self.param, self.request_id = status, type_, message, param, request_id


@dataclass(frozen=True)
class _Req(Generic[T]):
    method: str
    path: str
    parse: Callable[[Json], T]
    body: Json | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _answer(req: _Req[T], resp: httpx.Response) -> T:
    if resp.is_success:
        return req.parse(resp.json())
    try:
        err = resp.json()["error"]
        raise GatewayError(resp.status_code, err.get("type", ""), err.get("message", ""), err.get("param"),
                           resp.headers.get("x-request-id", ""))
    except (ValueError, KeyError, TypeError, AttributeError):  # not the envelope (a proxy in between)
        raise GatewayError(resp.status_code, "http_error", resp.text[:200], None, resp.headers.get("x-request-id", "")) from None


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _same(body: Json) -> Json:
    return body


class _GatewayCalls:
    """The gateway's routes; each returns the result (GatewayClient) or an awaitable of it (AsyncGatewayClient)."""

    _call: Callable[[_Req], Any]

    def classify(self, text: str, task: str, path: str = "bridge", *, request_id: str | None = None) -> Json:
        """POST /v1/classify: {task, label, scores, path, timings_ms, wire_bytes, request_id, bridge_id, relay_text}."""
        return self._call(_Req("POST", "/v1/classify", _same, {"text": text, "task": task, "path": path},
                               {"X-Request-ID": request_id} if request_id else {}))

    def compare(self, text: str, task: str, *, request_id: str | None = None) -> Json:
        """POST /v1/compare: both paths, {bridge, text, speedup, wire_ratio, agree, …}."""
        return self._call(_Req("POST", "/v1/compare", _same, {"text": text, "task": task},
                               {"X-Request-ID": request_id} if request_id else {}))

    def tasks(self) -> list[Json]:
        """GET /v1/tasks: [{name, labels, bridge}, …]."""
        return self._call(_Req("GET", "/v1/tasks", lambda b: b["tasks"]))

    def info(self) -> Json:
        """GET /v1/info: gateway version and each service's status and model."""
        return self._call(_Req("GET", "/v1/info", _same))

    def ready(self) -> Json:
        """GET /readyz: {"status": "ready", "services": …}; GatewayError 503 when not ready."""
        return self._call(_Req("GET", "/readyz", _same))


class GatewayClient(_GatewayCalls):
    """Blocking; thread-safe (one httpx.Client). `api_key` is sent as a bearer token."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None):
        self._http = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport)

    def _call(self, req: _Req[T]) -> T:
        return _answer(req, self._http.request(req.method, req.path, json=req.body, headers=req.headers))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncGatewayClient(_GatewayCalls):
    """asyncio (one httpx.AsyncClient): `await gw.classify(...)`."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None):
        self._http = httpx.AsyncClient(base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport)

    async def _await(self, req: _Req[T]) -> T:
        return _answer(req, await self._http.request(req.method, req.path, json=req.body, headers=req.headers))

    def _call(self, req: _Req[T]):  # -> Awaitable[T]
        return self._await(req)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncGatewayClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
