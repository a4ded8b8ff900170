"""Edge checks both services apply to request fields; each failure names the field and its gRPC status."""

from __future__ import annotations

import grpc

from telepathy.bridge.tasks import TaskSpec, UnknownTaskError, get_task
from telepathy.serving.errors import ServiceError, invalid


def require_task(task: str, field: str = "task") -> TaskSpec:
    if not task:
        raise invalid(field, "is required")
    try:
        return get_task(task)
    except UnknownTaskError as exc:
        raise ServiceError(grpc.StatusCode.NOT_FOUND, f"{field}: {exc}", field) from None


def check_text(text: str, max_chars: int, field: str = "text", allow_empty: bool = False) -> str:
    if not allow_empty and not text.strip():
        raise invalid(field, "must not be empty")
    if len(text) > max_chars:
        raise invalid(field, f"{len(text)} characters exceed the limit of {max_chars}")
    return text
