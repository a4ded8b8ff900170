from . import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassifyRequest(_message.Message):
    __slots__ = ("soft_tokens",)
    SOFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    soft_tokens: _common_pb2.SoftTokens
    def __init__(self, soft_tokens: _Optional[_Union[_common_pb2.SoftTokens, _Mapping]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: _common_pb2.ClassifyResult
    def __init__(self, result: _Optional[_Union[_common_pb2.ClassifyResult, _Mapping]] = ...) -> None: ...

class ClassifyStreamRequest(_message.Message):
    __slots__ = ("soft_tokens", "timeout_ms", "text", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SOFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    soft_tokens: _common_pb2.SoftTokens
    timeout_ms: int
    text: ClassifyTextRequest
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, soft_tokens: _Optional[_Union[_common_pb2.SoftTokens, _Mapping]] = ..., timeout_ms: _Optional[int] = ..., text: _Optional[_Union[ClassifyTextRequest, _Mapping]] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ClassifyStreamResponse(_message.Message):
    __slots__ = ("request_id", "result", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    result: _common_pb2.ClassifyResult
    error: _common_pb2.Error
    def __init__(self, request_id: _Optional[str] = ..., result: _Optional[_Union[_common_pb2.ClassifyResult, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ...) -> None: ...

class ClassifyTextRequest(_message.Message):
    __slots__ = ("request_id", "task", "text")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    task: str
    text: str
    def __init__(self, request_id: _Optional[str] = ..., task: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class ClassifyTextResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: _common_pb2.ClassifyResult
    def __init__(self, result: _Optional[_Union[_common_pb2.ClassifyResult, _Mapping]] = ...) -> None: ...

class ListBridgesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBridgesResponse(_message.Message):
    __slots__ = ("bridges",)
    BRIDGES_FIELD_NUMBER: _ClassVar[int]
    bridges: _containers.RepeatedCompositeFieldContainer[_common_pb2.BridgeInfo]
    def __init__(self, bridges: _Optional[_Iterable[_Union[_common_pb2.BridgeInfo, _Mapping]]] = ...) -> None: ...

class ReceiverInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReceiverInfoResponse(_message.Message):
    __slots__ = ("version", "model", "tasks", "limits", "wire_dtypes", "state", "catalog")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    version: str
    model: _common_pb2.ModelInfo
    tasks: _containers.RepeatedScalarFieldContainer[str]
    limits: _common_pb2.Limits
    wire_dtypes: _containers.RepeatedScalarFieldContainer[str]
    state: str
    catalog: _containers.RepeatedCompositeFieldContainer[_common_pb2.TaskInfo]
    def __init__(self, version: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., tasks: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[_common_pb2.Limits, _Mapping]] = ..., wire_dtypes: _Optional[_Iterable[str]] = ..., state: _Optional[str] = ..., catalog: _Optional[_Iterable[_Union[_common_pb2.TaskInfo, _Mapping]]] = ...) -> None: ...
