"""Edge checks both services apply to request fields; each failure names the field and its gRPC status.

What a request may contain (docs/SERVICES.md, "What a request may contain"):
  * identifiers (request_id, task, bridge_id, bridge_fingerprint): at most MAX_ID_CHARS characters and no
    control character of any kind (C0, DEL, C1), as the gateway rules for `task`. They are echoed in answers and
    errors, so they must stay small;
  * texts: at most the service's max_text_chars characters, no NUL (tokenizers and C-string tools downstream
    treat it as the end of the text); every other character, other controls included, is the model's business.
A task must be one of the service's own catalog (`require_task(task, engine.bridges.tasks)`): the built-ins and the
tasks of the bridges it loaded, so a bridge trained for a task of its own is served with no other file.
Invalid UTF-8 (a lone surrogate included: UTF-8 cannot encode one) never gets this far: the request does not
decode (serving/server.py).
"""

from __future__ import annotations

import re

import grpc

from telepathy.bridge.tasks import TaskCatalog, TaskSpec, UnknownTaskError
from telepathy.contract import MAX_ID_CHARS
from telepathy.serving.errors import ServiceError, invalid

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL, C1: what the gateway refuses in a task


def id_problem(value: str) -> str | None:
    """Why `value` cannot be an identifier, or None when it can (empty counts as valid: callers decide)."""
    if len(value) > MAX_ID_CHARS:
        return f"is {len(value)} characters; the limit is {MAX_ID_CHARS}"
    found = _CONTROL.search(value)
    if found:
        return (f"must not contain control characters (U+0000 to U+001F, U+007F to U+009F); found "
                f"U+{ord(found.group()):04X} at index {found.start()}")
    return None


def check_id(value: str, field: str) -> str:
    problem = id_problem(value)
    if problem:
        raise invalid(field, problem)
    return value


def require_task(task: str, catalog: TaskCatalog, field: str = "task") -> TaskSpec:
    """The spec of `task` in `catalog` (the service engine's `bridges.tasks`); NOT_FOUND listing the known tasks."""
    if not task:
        raise invalid(field, "is required")
    check_id(task, field)
    try:
        return catalog[task]
    except UnknownTaskError as exc:
        raise ServiceError(grpc.StatusCode.NOT_FOUND, f"{field}: {exc}", field) from None


def check_text(text: str, max_chars: int, field: str = "text", allow_empty: bool = False) -> str:
    if not allow_empty and not text.strip():
        raise invalid(field, "must not be empty")
    if len(text) > max_chars:
        raise invalid(field, f"{len(text)} characters exceed the limit of {max_chars}")
    nul = text.find("\x00")
    if nul >= 0:
        raise invalid(field, f"must not contain NUL characters (U+0000); found one at index {nul}")
    return text
