"""GrpcServer: the grpc.aio server every Telepathy service runs on.

It applies the shared options (message sizes, keepalive, no SO_REUSEPORT), the token interceptor when a token is
set, TLS/mTLS when cert files are set, grpc.health.v1 (NOT_SERVING until `set_serving(True)`, and again for
good once `stop` begins) and server reflection. The service adds its own servicer and decides when it is ready.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from telepathy.config import ServiceSettings
from telepathy.serving.auth import TokenAuthInterceptor, server_credentials
from telepathy.serving.channels import server_options
from telepathy.serving.metrics import ServiceMetrics

log = logging.getLogger(__name__)


class GrpcServer:
    def __init__(self, settings: ServiceSettings, service_names: list[str], metrics: ServiceMetrics):
        self.settings = settings
        self.service_names = list(service_names)
        interceptors = []
        if settings.auth_token:
            def denied(method: str) -> None:  # "/telepathy.v1.Sender/Relay" → counted under "Relay"
                metrics.observe_request(method.rsplit("/", 1)[-1], grpc.StatusCode.UNAUTHENTICATED, 0.0)

            interceptors.append(TokenAuthInterceptor(settings.auth_token, on_denied=denied))
        self.server = grpc.aio.server(interceptors=interceptors, options=server_options(settings.max_message_bytes))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
        self.port: int | None = None

    def add_servicer(self, add_to_server: Callable, servicer) -> None:
        add_to_server(servicer, self.server)

    async def start(self) -> int:
        """Bind and start serving RPCs (health says NOT_SERVING until the service calls set_serving)."""
        await self.set_serving(False)
        s = self.settings
        try:
            if s.tls_cert:
                port = self.server.add_secure_port(s.address, server_credentials(s.tls_cert, s.tls_key, s.tls_ca))
            else:
                port = self.server.add_insecure_port(s.address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {s.address}: {exc}") from None
        if not port:
            raise OSError(f"cannot listen on {s.address} (address in use?)")
        self.port = port
        await self.server.start()
        return port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def enter_drain(self) -> None:
        """Health → NOT_SERVING for good, so balancers stop routing here before the server stops."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        """Refuse new RPCs, give in-flight ones `grace` seconds, then cancel what is left."""
        await self.enter_drain()
        await self.server.stop(grace)
