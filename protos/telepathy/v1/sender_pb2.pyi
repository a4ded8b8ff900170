from . import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Path(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PATH_UNSPECIFIED: _ClassVar[Path]
    PATH_BRIDGE: _ClassVar[Path]
    PATH_TEXT: _ClassVar[Path]
PATH_UNSPECIFIED: Path
PATH_BRIDGE: Path
PATH_TEXT: Path

class RelayRequest(_message.Message):
    __slots__ = ("request_id", "task", "text", "path", "max_relay_tokens", "wire_dtype")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MAX_RELAY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    task: str
    text: str
    path: Path
    max_relay_tokens: int
    wire_dtype: _common_pb2.DType
    def __init__(self, request_id: _Optional[str] = ..., task: _Optional[str] = ..., text: _Optional[str] = ..., path: _Optional[_Union[Path, str]] = ..., max_relay_tokens: _Optional[int] = ..., wire_dtype: _Optional[_Union[_common_pb2.DType, str]] = ...) -> None: ...

class RelayResponse(_message.Message):
    __slots__ = ("result", "path", "wire_bytes", "relay_text")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RELAY_TEXT_FIELD_NUMBER: _ClassVar[int]
    result: _common_pb2.ClassifyResult
    path: Path
    wire_bytes: int
    relay_text: str
    def __init__(self, result: _Optional[_Union[_common_pb2.ClassifyResult, _Mapping]] = ..., path: _Optional[_Union[Path, str]] = ..., wire_bytes: _Optional[int] = ..., relay_text: _Optional[str] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("request_id", "task", "text", "wire_dtype")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    task: str
    text: str
    wire_dtype: _common_pb2.DType
    def __init__(self, request_id: _Optional[str] = ..., task: _Optional[str] = ..., text: _Optional[str] = ..., wire_dtype: _Optional[_Union[_common_pb2.DType, str]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("soft_tokens", "timings_us")
    class TimingsUsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SOFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_US_FIELD_NUMBER: _ClassVar[int]
    soft_tokens: _common_pb2.SoftTokens
    timings_us: _containers.ScalarMap[str, int]
    def __init__(self, soft_tokens: _Optional[_Union[_common_pb2.SoftTokens, _Mapping]] = ..., timings_us: _Optional[_Mapping[str, int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "task", "text", "max_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    task: str
    text: str
    max_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., task: _Optional[str] = ..., text: _Optional[str] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "num_tokens", "timings_us")
    class TimingsUsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_US_FIELD_NUMBER: _ClassVar[int]
    text: str
    num_tokens: int
    timings_us: _containers.ScalarMap[str, int]
    def __init__(self, text: _Optional[str] = ..., num_tokens: _Optional[int] = ..., timings_us: _Optional[_Mapping[str, int]] = ...) -> None: ...

class SenderInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SenderInfoResponse(_message.Message):
    __slots__ = ("version", "model", "bridges", "limits", "receiver_address", "receiver_connected", "state", "tasks")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BRIDGES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    version: str
    model: _common_pb2.ModelInfo
    bridges: _containers.RepeatedCompositeFieldContainer[_common_pb2.BridgeInfo]
    limits: _common_pb2.Limits
    receiver_address: str
    receiver_connected: bool
    state: str
    tasks: _containers.RepeatedCompositeFieldContainer[_common_pb2.TaskInfo]
    def __init__(self, version: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., bridges: _Optional[_Iterable[_Union[_common_pb2.BridgeInfo, _Mapping]]] = ..., limits: _Optional[_Union[_common_pb2.Limits, _Mapping]] = ..., receiver_address: _Optional[str] = ..., receiver_connected: _Optional[bool] = ..., state: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[_common_pb2.TaskInfo, _Mapping]]] = ...) -> None: ...
