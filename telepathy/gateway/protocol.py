"""HTTP protocol of the gateway: pydantic models only (the logic lives in serving.py).

These models are the public contract of /v1/*; FastAPI derives the OpenAPI schema at /docs from them.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PathName = Literal["bridge", "text"]

# JSON's \uXXXX escapes can spell half a surrogate pair, which Python keeps as a str but UTF-8 (protobuf, our own
# JSON responses, the logs) cannot encode: refused here, once, instead of failing deep inside a gRPC call.
_SURROGATE = re.compile("[\ud800-\udfff]")
# A NUL ends the text early for anything C-shaped downstream (tokenizers, logs, databases); the other controls
# in a text (tabs, newlines, stray escape codes from a copy-paste) are the model's business and pass.
_NUL = re.compile("\x00")
# A task is a name such as sst2: no control character of any kind (C0, DEL, C1) belongs in one.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _refuse(pattern: re.Pattern[str], value: str, what: str) -> None:
    found = pattern.search(value)
    if found:
        raise ValueError(what.format(code=f"U+{ord(found.group()):04X}"))


def _encodable(value: str) -> str:
    _refuse(_SURROGATE, value, "contains a lone surrogate ({code}) that UTF-8 cannot encode")
    return value


class _Request(BaseModel):
    # Unknown fields are an error, not silently ignored: a typo such as "paht" must not quietly run the default.
    model_config = ConfigDict(extra="forbid")

    text: str = Field(description="Input to classify. Non-empty, not only whitespace, no NUL, valid Unicode (no lone "
                                  "surrogate); at most the gateway's max_text_chars characters.")
    task: str = Field(description="Task name: one of GET /v1/tasks, i.e. a built-in task or the task of a bridge the "
                                  "services loaded (a name no service knows is 404). No control characters.")

    @field_validator("text")
    @classmethod
    def _text_is_text(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty or whitespace")
        _refuse(_NUL, _encodable(v), "contains a NUL character ({code}), which is not allowed")
        return v

    @field_validator("task")
    @classmethod
    def _task_is_a_name(cls, v: str) -> str:
        _refuse(_CONTROL, _encodable(v), "contains a control character ({code}); a task is a name such as sst2")
        return v


class ClassifyRequest(_Request):
    path: PathName = Field("bridge", description="bridge: soft tokens; text: the sender writes a relay text.")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"text": "a gripping, beautifully acted film", "task": "sst2", "path": "bridge"}]},
    )


class CompareRequest(_Request):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"text": "Who invented the telephone?", "task": "trec"}]},
    )


class Timings(BaseModel):
    """Milliseconds. sender/wire/receiver come from the services (queue + model time on each side; wire = the
    sender→receiver hop). total is measured by the gateway around its call, so it also covers gateway↔sender."""

    sender: float
    wire: float
    receiver: float
    total: float


class ClassifyResponse(BaseModel):
    task: str
    label: str
    scores: dict[str, float] = Field(description="label → probability, in the task's label order")
    path: PathName
    timings_ms: Timings
    wire_bytes: int = Field(description="payload bytes the sender sent to the receiver (soft-token tensor or relay text)")
    request_id: str
    bridge_id: str | None = Field(None, description="bridge that made the soft tokens (bridge path)")
    relay_text: str | None = Field(None, description="what the sender told the receiver (text path)")


class CompareResponse(BaseModel):
    task: str
    request_id: str
    bridge: ClassifyResponse
    text: ClassifyResponse
    speedup: float = Field(description="text total_ms / bridge total_ms (> 1: the bridge path was faster)")
    wire_ratio: float = Field(description="text wire_bytes / bridge wire_bytes")
    agree: bool = Field(description="both paths chose the same label")


class TaskInfo(BaseModel):
    name: str
    labels: list[str] = Field(description="label names in index order")
    bridge: bool = Field(description="the sender has a bridge for this task (the bridge path works); false: text "
                                     "path only")


class TasksResponse(BaseModel):
    """Every task the sender serves, from its Sender.Info: the built-in tasks, then the tasks its bridges carry."""

    tasks: list[TaskInfo]

    model_config = ConfigDict(json_schema_extra={"examples": [{"tasks": [
        {"name": "sst2", "labels": ["negative", "positive"], "bridge": True},
        {"name": "urgency", "labels": ["low", "high"], "bridge": True}]}]})


class ServiceInfo(BaseModel):
    address: str
    status: str = Field(description="grpc.health.v1 status (SERVING, NOT_SERVING, …) or UNAVAILABLE/UNKNOWN")
    model: str | None = None
    architecture: str | None = None
    device: str | None = None
    dtype: str | None = None
    version: str | None = None
    bridges: list[str] | None = None


class InfoResponse(BaseModel):
    gateway_version: str
    sender: ServiceInfo
    receiver: ServiceInfo


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    services: dict[str, str] = Field(
        description="sender / receiver: grpc.health.v1 status (SERVING, NOT_SERVING, UNAVAILABLE, …); "
                    "link: the sender's stream to the receiver (CONNECTED, DISCONNECTED, or the gRPC code of a "
                    "failed Sender.Info call, e.g. UNAVAILABLE, UNAUTHENTICATED)")


class ErrorDetail(BaseModel):
    type: str = Field(description="stable machine-readable kind, e.g. not_found_error")
    message: str
    param: str | None = Field(None, description="the offending request field, when there is one")


class ErrorResponse(BaseModel):
    error: ErrorDetail
