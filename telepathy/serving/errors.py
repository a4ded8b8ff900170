"""The one place that turns exceptions into gRPC statuses.

Servicer code raises plain exceptions (ours and bridge/'s); `status_of` maps them, `grpc_method` wraps every
unary RPC so that the mapping, the `telepathy-error-field` trailer and the request metrics happen in one spot,
and stream handlers call `status_of` to build per-item Error messages. Anything unexpected becomes INTERNAL
with a generic message (the details go to the log, never to the caller).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass

import grpc

from telepathy.bridge.checkpoint import FingerprintMismatch
from telepathy.bridge.codec import WireFormatError
from telepathy.bridge.runtime.engine import BridgeNotFoundError
from telepathy.bridge.tasks import UnknownTaskError
from telepathy.contract import FIELD_TRAILER
from telepathy.serving.batcher import BatcherClosedError, DeadlineExpiredError, QueueFullError

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error with a known gRPC status; `field` names the offending request field, when there is one."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


def invalid(field: str, message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", field)


def unavailable(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message)


@dataclass(frozen=True)
class _Rule:
    code: grpc.StatusCode
    field: str = ""


_RULES: list[tuple[type[BaseException], _Rule]] = [
    (UnknownTaskError, _Rule(grpc.StatusCode.NOT_FOUND, "task")),
    (BridgeNotFoundError, _Rule(grpc.StatusCode.NOT_FOUND, "bridge_id")),
    (FingerprintMismatch, _Rule(grpc.StatusCode.FAILED_PRECONDITION, "bridge_fingerprint")),
    (WireFormatError, _Rule(grpc.StatusCode.INVALID_ARGUMENT)),
    (QueueFullError, _Rule(grpc.StatusCode.RESOURCE_EXHAUSTED)),
    (DeadlineExpiredError, _Rule(grpc.StatusCode.DEADLINE_EXCEEDED)),
    (asyncio.TimeoutError, _Rule(grpc.StatusCode.DEADLINE_EXCEEDED)),
    (BatcherClosedError, _Rule(grpc.StatusCode.UNAVAILABLE)),
]


def status_of(exc: BaseException) -> ServiceError:
    if isinstance(exc, ServiceError):
        return exc
    for kind, rule in _RULES:
        if isinstance(exc, kind):
            field = getattr(exc, "field", "") or rule.field
            message = str(exc) or ("deadline exceeded" if rule.code == grpc.StatusCode.DEADLINE_EXCEEDED else kind.__name__)
            return ServiceError(rule.code, message, field)
    log.exception("unexpected error", exc_info=exc)
    return ServiceError(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the service log")


def grpc_method(name: str):
    """Decorate an async unary servicer method: map exceptions to statuses and record request metrics.

    The servicer instance must have `.metrics` (rpc.metrics.ServiceMetrics).
    """

    def decorate(fn):
        @functools.wraps(fn)
        async def wrapper(self, request, context: grpc.aio.ServicerContext):
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return await fn(self, request, context)
            except asyncio.CancelledError:  # the client went away or its deadline passed
                left = context.time_remaining()
                code = grpc.StatusCode.DEADLINE_EXCEEDED if left is not None and left <= 0 else grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # noqa: BLE001 - this is the mapping point
                err = status_of(exc)
                code = err.code
                if err.field:
                    context.set_trailing_metadata(((FIELD_TRAILER, err.field),))
                await context.abort(err.code, err.message)
            finally:
                self.metrics.observe_request(name, code, time.perf_counter() - start)

        return wrapper

    return decorate
