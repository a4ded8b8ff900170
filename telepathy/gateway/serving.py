"""Gateway logic: input checks, the sender client, the error map, concurrency limit, metrics.

Routes (routes/) are thin: they call `GatewayService` methods and let `GatewayError` (the only exception the
service raises on purpose) become the JSON error envelope (errors.py).

One request: the edge (edge.py: request id → API key → body size, type, encoding) → body (pydantic) → length
check → concurrency slot → sender.Relay with the remaining request budget as its gRPC deadline → result →
response. Nothing waits in a gateway queue. The gateway knows no task: the sender checks the task against its own
catalog (an unknown one is its NOT_FOUND, our 404 listing the tasks it knows), and GET /v1/tasks is Sender.Info's
list.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from telepathy.contract import VERSION
from telepathy.gateway import protocol
from telepathy.gateway.errors import UPSTREAM_MESSAGES, GatewayError, error_from_grpc
from telepathy.gateway.settings import GatewaySettings
from telepathy.protos.v1 import receiver_pb2, receiver_pb2_grpc, sender_pb2, sender_pb2_grpc
from telepathy.serving.channels import ClientSettings, make_channel
from telepathy.serving.tracing import Tracing, set_attributes

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
# What we accept from clients as a request id: short, printable, safe to log and to pass on as gRPC data.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")  # used with fullmatch ($ would allow "id\n")

PATHS: dict[str, int] = {"bridge": sender_pb2.PATH_BRIDGE, "text": sender_pb2.PATH_TEXT}


# ---------------------------------------------------------------------------------------------------------------
# Small pieces: request ids, API keys, the concurrency limit, the request budget.
# ---------------------------------------------------------------------------------------------------------------

def request_id_from(header_value: str | None) -> str:
    """The client's X-Request-ID when it is sane (so their traces line up with ours), else a fresh one."""
    if header_value and _SANE_REQUEST_ID.fullmatch(header_value):
        return header_value
    return uuid.uuid4().hex


def check_api_key(keys: tuple[str, ...], authorization: str | None, x_api_key: str | None) -> None:
    if not keys:
        return
    presented = x_api_key
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            presented = value.strip()
    headers = {"WWW-Authenticate": "Bearer"}
    if not presented:
        raise GatewayError(401, "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'", headers=headers)
    # Compare against every key without short-circuiting, so timing does not reveal which prefix matched.
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(presented.encode(), key.encode())
    if not ok:
        raise GatewayError(401, "invalid API key", headers=headers)


class ConcurrencyLimiter:
    """At most `limit` requests inside at once; the next one is refused at once (no waiting room).

    Single event loop, no awaits between check and increment, so a plain counter is race-free."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        if self.in_flight >= self.limit:
            raise GatewayError(429, f"too many requests in flight (limit {self.limit}); retry later",
                               headers={"Retry-After": "1"})
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


class Budget:
    """The request's end-to-end deadline; every outgoing call gets what is left of it."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise GatewayError(504, UPSTREAM_MESSAGES[504])
        return left


# ---------------------------------------------------------------------------------------------------------------
# Metrics (a per-app registry: two apps in one process, as in the tests, never share counters).
# ---------------------------------------------------------------------------------------------------------------

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter("telepathy_gateway_http_requests", "HTTP responses by route and status",
                                     ["route", "method", "status"], registry=r)
        self.http_seconds = Histogram("telepathy_gateway_http_request_seconds", "HTTP request wall time by route",
                                      ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.stage_seconds = Histogram("telepathy_gateway_stage_seconds",
                                       "per-stage time of successful classifications (sender, wire, receiver, total)",
                                       ["path", "stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.classifications = Counter("telepathy_gateway_classifications", "classification outcomes by path and HTTP status",
                                       ["path", "status"], registry=r)
        self.upstream_errors = Counter("telepathy_gateway_upstream_errors", "failed gRPC calls by service and code",
                                       ["service", "code"], registry=r)
        self.wire_bytes = Histogram("telepathy_gateway_wire_bytes", "sender→receiver payload bytes per request",
                                    ["path"], buckets=(64, 256, 1024, 4096, 16384, 65536, 262144), registry=r)
        self.in_flight = Gauge("telepathy_gateway_in_flight", "classify/compare requests in flight", registry=r)


# ---------------------------------------------------------------------------------------------------------------
# gRPC clients.
# ---------------------------------------------------------------------------------------------------------------

def client_settings(settings: GatewaySettings) -> ClientSettings:
    """The telepathy.serving.channels view of our settings: token, TLS files, message size. Built explicitly (not from_env) so that
    a GatewaySettings fully describes the gateway, whatever the process environment holds."""
    return ClientSettings(auth_token=settings.auth_token, tls_ca=settings.tls_ca, tls_cert=settings.tls_cert,
                          tls_key=settings.tls_key, tls_server_name=settings.tls_server_name,
                          timeout_s=settings.request_timeout_s)


class ServiceClients:
    """The gateway's long-lived gRPC channels: the sender (all work) and, optionally, the receiver (health only).

    Created in the app's lifespan, inside the running event loop (grpc.aio channels are bound to it)."""

    def __init__(self, settings: GatewaySettings, tracing: Tracing | None = None):
        self.settings = settings
        self.tracing = tracing or Tracing()
        self.sender_channel: grpc.aio.Channel | None = None
        self.receiver_channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        # telepathy.serving.channels is the one way to dial a service: it adds the bearer token to every call, TLS when
        # configured, message limits and keepalive/reconnect options that match the servers' settings (a restarted
        # sender is found again within ~2 s, so /readyz and requests recover quickly).
        client = client_settings(self.settings)
        self.sender_channel = make_channel(self.settings.sender_addr, client,
                                           interceptors=self.tracing.client_interceptors())
        self.sender = sender_pb2_grpc.SenderStub(self.sender_channel)
        self.sender_health = health_pb2_grpc.HealthStub(self.sender_channel)
        if self.settings.receiver_addr:
            self.receiver_channel = make_channel(self.settings.receiver_addr, client)
            self.receiver = receiver_pb2_grpc.ReceiverStub(self.receiver_channel)
            self.receiver_health = health_pb2_grpc.HealthStub(self.receiver_channel)

    async def close(self) -> None:
        for ch in (self.sender_channel, self.receiver_channel):
            if ch is not None:
                await ch.close(grace=None)

    async def relay(self, request: sender_pb2.RelayRequest, timeout: float) -> sender_pb2.RelayResponse:
        return await self.sender.Relay(request, timeout=timeout)

    async def sender_info(self, timeout: float) -> sender_pb2.SenderInfoResponse:
        return await self.sender.Info(sender_pb2.SenderInfoRequest(), timeout=timeout)

    async def receiver_info(self, timeout: float) -> receiver_pb2.ReceiverInfoResponse:
        return await self.receiver.Info(receiver_pb2.ReceiverInfoRequest(), timeout=timeout)

    async def receiver_bridges(self, timeout: float) -> receiver_pb2.ListBridgesResponse:
        return await self.receiver.ListBridges(receiver_pb2.ListBridgesRequest(), timeout=timeout)

    async def health(self, which: str, timeout: float) -> str:
        """grpc.health.v1 status name of the whole server (service ""), or UNAVAILABLE/… when the call fails."""
        stub = self.sender_health if which == "sender" else self.receiver_health
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name if hasattr(exc, "code") else "UNKNOWN"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


# ---------------------------------------------------------------------------------------------------------------
# The service behind the routes.
# ---------------------------------------------------------------------------------------------------------------

def _model_fields(model: Any) -> dict[str, str | None]:
    """common_pb2.ModelInfo → ServiceInfo fields; proto3 empty strings become null (unknown)."""
    return {"model": model.spec or None, "architecture": model.architecture or None,
            "device": model.device or None, "dtype": model.dtype or None}


def _ms(us: int) -> float:
    return round(us / 1000.0, 3)


class GatewayService:
    def __init__(self, settings: GatewaySettings, clients: ServiceClients, metrics: GatewayMetrics):
        self.tracing = getattr(clients, "tracing", None) or Tracing()  # the clients' (fakes in tests have none)
        self.settings = settings
        self.clients = clients
        self.metrics = metrics
        self.limiter = ConcurrencyLimiter(settings.max_concurrency)

    # -- checks done here, before anything reaches the sender -------------------------------------------------
    def check_input(self, text: str) -> None:
        """The text's length. The task is the sender's to check: only it knows which tasks it serves."""
        if len(text) > self.settings.max_text_chars:
            raise GatewayError(413, f"text is {len(text)} characters; the limit is {self.settings.max_text_chars}",
                               param="text")

    # -- /v1/classify, /v1/compare ----------------------------------------------------------------------------
    async def classify(self, req: protocol.ClassifyRequest, request_id: str) -> protocol.ClassifyResponse:
        budget = Budget(self.settings.request_timeout_s)
        self.check_input(req.text)
        with self._slot():
            return await self._run_path(req.task, req.text, req.path, request_id, request_id, budget)

    async def compare(self, req: protocol.CompareRequest, request_id: str) -> protocol.CompareResponse:
        budget = Budget(self.settings.request_timeout_s)
        self.check_input(req.text)
        with self._slot():
            # One after the other, not concurrently: run together they would compete for the same CPU/GPU and
            # each would look slower than it is; the speed-up must compare the paths on equal terms.
            bridge = await self._run_path(req.task, req.text, "bridge", request_id, f"{request_id}:bridge", budget)
            relay = await self._run_path(req.task, req.text, "text", request_id, f"{request_id}:text", budget)
        return protocol.CompareResponse(
            task=req.task, request_id=request_id, bridge=bridge, text=relay,
            speedup=round(relay.timings_ms.total / max(bridge.timings_ms.total, 1e-6), 3),
            wire_ratio=round(relay.wire_bytes / max(bridge.wire_bytes, 1), 3),
            agree=bridge.label == relay.label,
        )

    @contextmanager
    def _slot(self) -> Iterator[None]:
        with self.limiter.slot():
            self.metrics.in_flight.inc()
            try:
                yield
            finally:
                self.metrics.in_flight.dec()

    async def _run_path(self, task: str, text: str, path: str, request_id: str, upstream_id: str,
                        budget: Budget) -> protocol.ClassifyResponse:
        request = sender_pb2.RelayRequest(request_id=upstream_id, task=task, text=text, path=PATHS[path],
                                          max_relay_tokens=self.settings.max_relay_tokens)
        start = time.perf_counter()
        with self.tracing.span(f"gateway {path}", task=task, path=path, request_id=upstream_id) as span:
            reply = await self._relay(request, path, budget)
            set_attributes(span, wire_bytes=int(reply.wire_bytes), label=reply.result.label or None)
        total_ms = (time.perf_counter() - start) * 1000.0
        response = self._to_response(reply, task, path, request_id, total_ms)
        self._observe(response)
        log.debug("classified task=%s path=%s label=%s in %.1f ms", task, path, response.label, total_ms)
        return response

    async def _relay(self, request: sender_pb2.RelayRequest, path: str, budget: Budget) -> sender_pb2.RelayResponse:
        try:
            return await self.clients.relay(request, timeout=budget.remaining())
        except grpc.RpcError as exc:
            self.metrics.upstream_errors.labels("sender", exc.code().name).inc()
            err = error_from_grpc(exc, "sender")
            self.metrics.classifications.labels(path, str(err.status)).inc()
            raise err from None
        except GatewayError as err:
            self.metrics.classifications.labels(path, str(err.status)).inc()
            raise

    @staticmethod
    def _to_response(reply: sender_pb2.RelayResponse, task: str, path: str, request_id: str,
                     total_ms: float) -> protocol.ClassifyResponse:
        result = reply.result
        t = result.timings_us
        # The services report per-stage times; sum each side's stages (queue + model, and anything they add later).
        sender_us = sum(v for k, v in t.items() if k.startswith("sender_"))
        receiver_us = sum(v for k, v in t.items() if k.startswith("receiver_"))
        timings = protocol.Timings(sender=_ms(sender_us), wire=_ms(t.get("wire", 0)), receiver=_ms(receiver_us),
                                   total=round(total_ms, 3))
        return protocol.ClassifyResponse(
            task=task, label=result.label, scores={s.label: round(float(s.probability), 6) for s in result.scores},
            path=path, timings_ms=timings, wire_bytes=int(reply.wire_bytes), request_id=request_id,
            bridge_id=result.bridge_id or None, relay_text=reply.relay_text if path == "text" else None,
        )

    def _observe(self, r: protocol.ClassifyResponse) -> None:
        m = self.metrics
        m.classifications.labels(r.path, "200").inc()
        for stage, ms in r.timings_ms.model_dump().items():
            m.stage_seconds.labels(r.path, stage).observe(ms / 1000.0)
        m.wire_bytes.labels(r.path).observe(r.wire_bytes)

    # -- /v1/tasks, /v1/info, /readyz -------------------------------------------------------------------------
    async def _sender_info(self) -> sender_pb2.SenderInfoResponse | None:
        try:
            return await self.clients.sender_info(timeout=self.settings.probe_timeout_s)
        except grpc.RpcError as exc:  # logged here, not in readiness: probes poll often, and the 503 says it
            self.metrics.upstream_errors.labels("sender", exc.code().name).inc()
            log.info("sender Info failed: %s %s", exc.code().name, exc.details())
            return None

    async def tasks(self) -> protocol.TasksResponse:
        """The sender's tasks (Sender.Info): the built-ins and its bridges' tasks. Without an answer from the sender
        there is no list to give: its failure maps as a request's would (down or loading: 503)."""
        try:
            info = await self.clients.sender_info(timeout=self.settings.probe_timeout_s)
        except grpc.RpcError as exc:
            self.metrics.upstream_errors.labels("sender", exc.code().name).inc()
            raise error_from_grpc(exc, "sender") from None
        return protocol.TasksResponse(tasks=[protocol.TaskInfo(name=t.name, labels=list(t.labels), bridge=t.bridge)
                                             for t in info.tasks])

    async def readiness(self) -> tuple[bool, dict[str, str], dict[str, str]]:
        """Ready = sender SERVING, receiver SERVING (grpc.health.v1) *and* the sender's stream to the receiver up;
        → (ready, each part's status, what each service not ready is doing: "warming up (…)", "loading …").

        Health alone can say SERVING twice while every request fails, e.g. when the two services disagree on the
        service token or TLS: the link state from Sender.Info catches that. Health says only NOT_SERVING while a
        service starts; its Info (state, or the UNAVAILABLE message while the model loads) says what for."""
        timeout = self.settings.probe_timeout_s
        if self.clients.receiver_channel is not None:
            sender, receiver, (info, code, s_doing), r_doing = await asyncio.gather(
                self.clients.health("sender", timeout), self.clients.health("receiver", timeout),
                self._sender_info_state(), self._receiver_state())
        else:
            # No receiver address configured: the sender's view of its receiver stream is the best we have.
            sender, (info, code, s_doing) = await asyncio.gather(self.clients.health("sender", timeout),
                                                                 self._sender_info_state())
            receiver = "UNKNOWN" if info is None else ("SERVING" if info.receiver_connected else "NOT_CONNECTED")
            r_doing = ""
        # When Info itself fails, its status code says why (UNAVAILABLE, UNAUTHENTICATED: a wrong service token).
        link = code if info is None else ("CONNECTED" if info.receiver_connected else "DISCONNECTED")
        services = {"sender": sender, "receiver": receiver, "link": link}
        waiting = {name: doing for name, status, doing in (("sender", sender, s_doing), ("receiver", receiver, r_doing))
                   if status != "SERVING" and doing}
        return (sender, receiver, link) == ("SERVING", "SERVING", "CONNECTED"), services, waiting

    async def _sender_info_state(self) -> tuple[sender_pb2.SenderInfoResponse | None, str, str]:
        """Sender.Info, its status code, and what the sender says it is doing (Info.state or the refusal)."""
        try:
            info = await self.clients.sender_info(timeout=self.settings.probe_timeout_s)
            return info, "OK", info.state
        except grpc.RpcError as exc:
            self.metrics.upstream_errors.labels("sender", exc.code().name).inc()
            return None, exc.code().name, _doing(exc)

    async def _receiver_state(self) -> str:
        try:
            return (await self.clients.receiver_info(timeout=self.settings.probe_timeout_s)).state
        except grpc.RpcError as exc:
            return _doing(exc)

    async def info(self) -> protocol.InfoResponse:
        timeout = self.settings.probe_timeout_s
        s_info = await self._sender_info()
        s_status = await self.clients.health("sender", timeout)
        sender = protocol.ServiceInfo(address=self.settings.sender_addr, status=s_status)
        if s_info is not None:
            sender = sender.model_copy(update=dict(
                _model_fields(s_info.model), version=s_info.version or None,
                bridges=sorted(b.bridge_id for b in s_info.bridges)))
        receiver_addr = self.settings.receiver_addr or (s_info.receiver_address if s_info is not None else "")
        receiver = protocol.ServiceInfo(address=receiver_addr, status="UNKNOWN")
        if self.clients.receiver_channel is not None:
            receiver.status = await self.clients.health("receiver", timeout)
            try:
                # Receiver.Info names only the tasks; the bridge ids (what has to match the sender's) come from
                # ListBridges.
                r, listed = await asyncio.gather(self.clients.receiver_info(timeout=timeout),
                                                 self.clients.receiver_bridges(timeout=timeout))
                receiver = receiver.model_copy(update=dict(_model_fields(r.model), version=r.version or None,
                                                           bridges=sorted(b.bridge_id for b in listed.bridges)))
            except grpc.RpcError as exc:
                log.info("receiver Info failed: %s %s", exc.code().name, exc.details())
        elif s_info is not None:
            receiver.status = "SERVING" if s_info.receiver_connected else "NOT_CONNECTED"
        return protocol.InfoResponse(gateway_version=VERSION, sender=sender, receiver=receiver)


def _doing(exc: grpc.RpcError) -> str:
    """What a starting service says it is doing, from its UNAVAILABLE refusal ("receiver is warming up (…); retry
    shortly" → "warming up (…)"); "" for other failures (a service that is down says nothing)."""
    details = exc.details() or ""
    if exc.code() != grpc.StatusCode.UNAVAILABLE or " is " not in details:
        return ""
    return details.split(" is ", 1)[1].removesuffix("; retry shortly")[:300]
