"""GrpcServer: the grpc.aio server every Telepathy service runs on.

It applies the shared options (message sizes, keepalive, no SO_REUSEPORT), the token interceptor when a token is
set, TLS/mTLS when cert files are set, grpc.health.v1 (NOT_SERVING until `set_serving(True)`, and again for
good once `stop` begins) and server reflection. The service adds its own servicer and decides when it is ready.

Every method's request deserializer is guarded (`DecodeGuard`): grpc.aio runs a unary request's deserializer
outside the handler and answers its exception with UNKNOWN, the exception's text and an ERROR traceback, though
bytes that are not a valid message (or a string field that is not UTF-8) are the caller's mistake.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from telepathy.config import ServiceSettings
from telepathy.serving.auth import TokenAuthInterceptor, server_credentials
from telepathy.serving.channels import server_options
from telepathy.serving.errors import Undecodable, abort, clip
from telepathy.serving.metrics import ServiceMetrics
from telepathy.serving.tracing import Tracing

log = logging.getLogger(__name__)
_KINDS = {(False, False): "unary_unary", (False, True): "unary_stream", (True, False): "stream_unary",
          (True, True): "stream_stream"}
_MAKE = {"unary_unary": grpc.unary_unary_rpc_method_handler, "unary_stream": grpc.unary_stream_rpc_method_handler,
         "stream_unary": grpc.stream_unary_rpc_method_handler, "stream_stream": grpc.stream_stream_rpc_method_handler}


def _message_name(deserializer, method: str) -> str:
    owner = getattr(deserializer, "__self__", None)  # generated code passes the message class's FromString
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return descriptor.full_name if descriptor is not None else f"request message of {method}"


def _guard_deserializer(deserializer, type_name: str, method: str):
    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any failure to decode is the caller's bad bytes
            log.warning("%s: undecodable %s (%d bytes): %s", method, type_name, len(data), clip(str(exc), 200))
            return Undecodable(type_name)

    return deserialize


def _guard_unary(behavior, on_reject: Callable[[], None]):
    """The handler refuses an Undecodable request with INVALID_ARGUMENT before the servicer sees it."""

    async def refuse(request: Undecodable, context) -> None:
        on_reject()
        await abort(context, request.error())

    if inspect.isasyncgenfunction(behavior):
        async def guarded_stream(request, context):
            if isinstance(request, Undecodable):
                await refuse(request, context)
            async for response in behavior(request, context):
                yield response

        return guarded_stream

    async def guarded(request, context):
        if isinstance(request, Undecodable):
            await refuse(request, context)
        return await behavior(request, context)

    return guarded


def _guard_request_stream(behavior, on_reject: Callable[[], None]):
    """The call ends with INVALID_ARGUMENT at the first Undecodable message of the stream."""

    async def requests(request_iterator, context):
        async for request in request_iterator:
            if isinstance(request, Undecodable):
                on_reject()
                await abort(context, request.error())
            yield request

    if inspect.isasyncgenfunction(behavior):
        async def guarded_stream(request_iterator, context):
            async for response in behavior(requests(request_iterator, context), context):
                yield response

        return guarded_stream

    async def guarded(request_iterator, context):
        return await behavior(requests(request_iterator, context), context)

    return guarded


def guard_handler(handler: grpc.RpcMethodHandler, method: str, on_reject: Callable[[str], None]) -> grpc.RpcMethodHandler:
    """`handler` with a deserializer that hands on an errors.Undecodable instead of raising, and a behaviour that
    answers it: INVALID_ARGUMENT for a unary request; for a request stream, too, unless the servicer method is marked
    errors.takes_undecodable (it answers such items itself). Sync handlers (none of ours) are left as they are."""
    kind = _KINDS[(handler.request_streaming, handler.response_streaming)]
    behavior = getattr(handler, kind)
    if handler.request_deserializer is None or not (
            inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
        return handler
    type_name = _message_name(handler.request_deserializer, method)

    def rejected() -> None:
        on_reject(method)

    if not handler.request_streaming:
        behavior = _guard_unary(behavior, rejected)
    elif not getattr(behavior, "takes_undecodable", False):
        behavior = _guard_request_stream(behavior, rejected)
    return _MAKE[kind](behavior, request_deserializer=_guard_deserializer(handler.request_deserializer, type_name, method),
                       response_serializer=handler.response_serializer)


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Innermost interceptor: hands out each method's guarded handler (made once per method and handler)."""

    def __init__(self, on_reject: Callable[[str], None]):
        self._on_reject = on_reject
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: nothing to cache, so a client cannot grow the dict
            return None
        method = handler_call_details.method
        cached = self._guarded.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, guard_handler(handler, method, self._on_reject))
            self._guarded[method] = cached
        return cached[1]


class GrpcServer:
    def __init__(self, settings: ServiceSettings, service_names: list[str], metrics: ServiceMetrics,
                 tracing: Tracing | None = None):
        self.settings = settings
        self.service_names = list(service_names)
        def counter(code: grpc.StatusCode) -> Callable[[str], None]:
            def count(method: str) -> None:  # "/telepathy.v1.Sender/Relay" → counted under "Relay"
                metrics.observe_request(method.rsplit("/", 1)[-1], code, 0.0)

            return count

        interceptors = tracing.server_interceptors() if tracing is not None else []  # outermost: refusals traced too
        if settings.auth_token:
            interceptors.append(TokenAuthInterceptor(settings.auth_token, on_denied=counter(grpc.StatusCode.UNAUTHENTICATED)))
        # Last, so innermost: the auth check runs first, and a refused caller's bytes are never decoded.
        interceptors.append(DecodeGuard(on_reject=counter(grpc.StatusCode.INVALID_ARGUMENT)))
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
