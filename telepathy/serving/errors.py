"""The one place that turns exceptions into gRPC statuses.

Servicer code raises plain exceptions (ours and bridge/'s); `status_of` maps them, `grpc_method` wraps every
unary RPC so that the mapping, the `telepathy-error-field` trailer (and the same field as a standard
google.rpc.BadRequest in `grpc-status-details-bin`), and the request metrics happen in one spot,
and stream handlers call `status_of` to build per-item Error messages. Anything unexpected becomes INTERNAL
with a generic message (the details go to the log, never to the caller).

Error details travel in gRPC trailing metadata, which clients cap at a few KiB (a longer status reaches the caller
as RESOURCE_EXHAUSTED instead of its own code), so every ServiceError's message is capped here, and client values
echoed into a message go through `clip`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from telepathy.bridge.checkpoint import FingerprintMismatch
from telepathy.bridge.codec import WireFormatError
from telepathy.bridge.runtime.engine import BridgeNotFoundError
from telepathy.bridge.tasks import UnknownTaskError
from telepathy.contract import FIELD_TRAILER, MAX_ID_CHARS
from telepathy.serving.batcher import BatcherClosedError, DeadlineExpiredError, QueueFullError

log = logging.getLogger(__name__)
MAX_ECHO_CHARS = 64  # of one client value quoted in an error message
MAX_DETAILS_BYTES = 1024  # of a whole message as UTF-8; percent-encoded on the wire, so at most 3 KiB of metadata
MAX_VIOLATION_CHARS = 256  # of a BadRequest FieldViolation's description (the full message is the Status's)
STATUS_DETAILS_KEY = "grpc-status-details-bin"  # where grpcio-status (and every gRPC language) reads google.rpc.Status


def clip(value: str, limit: int = MAX_ECHO_CHARS) -> str:
    """A client value as an error message may quote it: at most `limit` characters, then an ellipsis."""
    return value if len(value) <= limit else value[:limit] + "…"


def bound_details(message: str) -> str:
    data = message.encode("utf-8", "replace")
    if len(data) <= MAX_DETAILS_BYTES:
        return message
    return data[: MAX_DETAILS_BYTES - 3].decode("utf-8", "ignore") + "…"


class ServiceError(Exception):
    """An error with a known gRPC status; `field` names the offending request field, when there is one."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = ""):
        message = bound_details(message)
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = clip(field, MAX_ID_CHARS)


def invalid(field: str, message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", field)


def unavailable(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message)


class Undecodable:
    """What a request deserializer guarded by serving/server.py hands on instead of raising: the bytes were not a
    valid `type_name` message (broken protobuf, or a string field that is not UTF-8)."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str):
        self.type_name = type_name

    def error(self) -> ServiceError:
        return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid {self.type_name} message "
                            "(undecodable protobuf, or a string field that is not valid UTF-8)")


def takes_undecodable(handler):
    """Mark a request-streaming handler that answers Undecodable items itself; any other stream ends with
    INVALID_ARGUMENT at its first undecodable message."""
    handler.takes_undecodable = True
    return handler


def caller_gone(context) -> grpc.StatusCode | None:
    """DEADLINE_EXCEEDED once the call's deadline has passed (gRPC itself has then given the caller its status),
    else None. A cancelled caller needs no check: grpc.aio cancels the handler's task."""
    left = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if left is not None and left <= 0 else None


def rich_status(err: ServiceError) -> status_pb2.Status:
    """`err` as a google.rpc.Status; with a field, its details hold a google.rpc.BadRequest naming it, which clients
    in any language read (Python: grpc_status.rpc_status.from_call). Status.message must equal the call's details.
    Worst case on the wire: base64 of ~1.6 KiB beside the 3 KiB details and the field trailer, well under 8 KiB."""
    status = status_pb2.Status(code=err.code.value[0], message=err.message)
    if err.field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=err.field, description=clip(err.message, MAX_VIOLATION_CHARS))
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        status.details.append(detail)
    return status


def error_trailers(err: ServiceError) -> tuple[tuple[str, str | bytes], ...]:
    """The trailing metadata a failed call carries: `telepathy-error-field` and the google.rpc.Status, with a field."""
    if not err.field:
        return ()
    return ((FIELD_TRAILER, err.field), (STATUS_DETAILS_KEY, rich_status(err).SerializeToString()))


async def abort(context, err: ServiceError):
    """End the call with `err`. If the caller is gone nobody can read a status, and sending one fails, which
    grpc.aio logs as an ERROR with a traceback; a caller going away is not an error, so the call ends as
    cancelled (grpc.aio logs that at DEBUG)."""
    if caller_gone(context) is None:
        if err.field:
            context.set_trailing_metadata(error_trailers(err))
        try:
            await context.abort(err.code, err.message)
        except grpc.aio.InternalError:  # the send failed: the call ended (deadline, caller gone) since the check
            pass
    log.debug("caller gone before its status could be sent: %s %s", err.code.name, err.message)
    raise asyncio.CancelledError


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
                response = await fn(self, request, context)
                if caller_gone(context) is not None:  # answered too late: sending it would fail (see abort)
                    raise asyncio.CancelledError
                return response
            except asyncio.CancelledError:  # the client went away or its deadline passed
                code = caller_gone(context) or grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # noqa: BLE001 - this is the mapping point
                err = status_of(exc)
                code = caller_gone(context) or err.code
                await abort(context, err)
            finally:
                self.metrics.observe_request(name, code, time.perf_counter() - start)

        return wrapper

    return decorate
