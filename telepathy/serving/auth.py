"""Service-to-service auth: a shared bearer token in call metadata, and TLS / mTLS from PEM files.

Server side, `TokenAuthInterceptor` answers UNAUTHENTICATED to any call whose `authorization` metadata is not
exactly `Bearer <token>` (compared in constant time). grpc.health.v1 stays open so that probes (kubelet,
grpc_health_probe, load balancers) need no secret; the health status reveals nothing. Client side,
`aio_token_interceptors()` / `SyncTokenInterceptor` add the header to every call of a channel, which works on
plaintext and TLS channels alike (gRPC call credentials would require TLS).

torch-free: the gateway imports this.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from pathlib import Path

import grpc

AUTH_METADATA_KEY = "authorization"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
UNAUTHENTICATED_MESSAGE = "missing or invalid authorization token (expected metadata 'authorization: Bearer <token>')"


def bearer(token: str) -> tuple[str, str]:
    return (AUTH_METADATA_KEY, f"Bearer {token}")


def _deny_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that only aborts, so streaming calls fail the same way unary ones do."""

    async def deny(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, on_denied: Callable[[str], None] | None = None, exempt: tuple[str, ...] = (HEALTH_PREFIX,)):
        if not token:
            raise ValueError("TokenAuthInterceptor needs a non-empty token")
        self._expected = f"Bearer {token}".encode()
        self._on_denied = on_denied
        self._exempt = exempt

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self._exempt):
            return handler
        presented = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == AUTH_METADATA_KEY:
                presented = value if isinstance(value, str) else value.decode("latin-1")
                break
        if hmac.compare_digest(presented.encode("utf-8", "replace"), self._expected):
            return handler
        if self._on_denied:
            self._on_denied(method)
        return _deny_handler(handler)


def _with_token(metadata, token: str) -> tuple:
    return tuple(metadata or ()) + (bearer(token),)


class _AioBearer:
    def __init__(self, token: str):
        self._token = token

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(d.method, d.timeout, _with_token(d.metadata, self._token), d.credentials, d.wait_for_ready)


class _AioBearerUnaryUnary(_AioBearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioBearerUnaryStream(_AioBearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioBearerStreamUnary(_AioBearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _AioBearerStreamStream(_AioBearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def aio_token_interceptors(token: str) -> list:
    """One interceptor per call kind: grpc.aio files an interceptor under the first kind it implements only."""
    return [kind(token) for kind in (_AioBearerUnaryUnary, _AioBearerUnaryStream, _AioBearerStreamUnary, _AioBearerStreamStream)]


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, d, metadata):
        self.method, self.timeout, self.metadata = d.method, d.timeout, metadata
        self.credentials = d.credentials
        self.wait_for_ready = getattr(d, "wait_for_ready", None)
        self.compression = getattr(d, "compression", None)


class SyncTokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str):
        self._token = token

    def _details(self, d):
        return _SyncDetails(d, _with_token(d.metadata, self._token))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def server_credentials(cert: str, key: str, ca: str = "") -> grpc.ServerCredentials:
    """TLS from PEM files; with `ca`, clients must present a certificate signed by it (mTLS)."""
    return grpc.ssl_server_credentials(
        [(_read(key), _read(cert))], root_certificates=_read(ca), require_client_auth=bool(ca)
    )


def channel_credentials(ca: str = "", cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """Verify the server with `ca` (system roots when empty); present `cert`/`key` for mTLS when given."""
    return grpc.ssl_channel_credentials(root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert))
