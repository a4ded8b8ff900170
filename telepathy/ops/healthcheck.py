"""Probes behind `telepathy healthcheck` (docker HEALTHCHECK, scripts): the gateway over HTTP, a service over
grpc.health.v1. Each returns (healthy, one-line detail) and never raises for an unhealthy target."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from telepathy.serving.channels import ClientSettings, make_sync_channel


def check_http(url: str, timeout_s: float = 3.0, api_key: str = "") -> tuple[bool, str]:
    """GET `url`; healthy on 200. A bare base URL probes /readyz (gateway *and* both services serving)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/readyz")
    target = urlunsplit(parts)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(target, timeout=timeout_s, headers=headers)
    except httpx.HTTPError as exc:
        return False, f"{target}: {type(exc).__name__}: {exc}"
    return r.status_code == 200, f"{target}: HTTP {r.status_code} {r.text[:200].strip()}"


def check_grpc(address: str, service: str = "", timeout_s: float = 3.0, settings: ClientSettings | None = None) -> tuple[bool, str]:
    """grpc.health.v1 Check on `address`; healthy on SERVING. Token/TLS from the environment, like the services
    (health itself is exempt from the token, but a TLS-only server still needs a TLS channel)."""
    settings = settings or ClientSettings.from_env()
    channel = make_sync_channel(address, settings)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.RpcError as exc:
        return False, f"{address}: {exc.code().name} {exc.details() or ''}".strip()
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{address} {service or '(server)'}: {status}"
