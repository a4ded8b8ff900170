from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FP32: _ClassVar[DType]
    DTYPE_FP16: _ClassVar[DType]
    DTYPE_BF16: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FP32: DType
DTYPE_FP16: DType
DTYPE_BF16: DType
DTYPE_INT8: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "raw_data", "scales")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    RAW_DATA_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    raw_data: bytes
    scales: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., raw_data: _Optional[bytes] = ..., scales: _Optional[bytes] = ...) -> None: ...

class SoftTokens(_message.Message):
    __slots__ = ("request_id", "task", "bridge_id", "bridge_fingerprint", "tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_ID_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    task: str
    bridge_id: str
    bridge_fingerprint: str
    tokens: Tensor
    def __init__(self, request_id: _Optional[str] = ..., task: _Optional[str] = ..., bridge_id: _Optional[str] = ..., bridge_fingerprint: _Optional[str] = ..., tokens: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    probability: float
    def __init__(self, label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class ClassifyResult(_message.Message):
    __slots__ = ("request_id", "task", "label", "label_index", "scores", "timings_us", "bridge_id")
    class TimingsUsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_US_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    task: str
    label: str
    label_index: int
    scores: _containers.RepeatedCompositeFieldContainer[LabelScore]
    timings_us: _containers.ScalarMap[str, int]
    bridge_id: str
    def __init__(self, request_id: _Optional[str] = ..., task: _Optional[str] = ..., label: _Optional[str] = ..., label_index: _Optional[int] = ..., scores: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., timings_us: _Optional[_Mapping[str, int]] = ..., bridge_id: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "field")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    field: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., field: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("spec", "architecture", "hidden_size", "num_layers", "vocab_size", "digest", "device", "dtype")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    spec: str
    architecture: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    digest: str
    device: str
    dtype: str
    def __init__(self, spec: _Optional[str] = ..., architecture: _Optional[str] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., vocab_size: _Optional[int] = ..., digest: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ...) -> None: ...

class BridgeInfo(_message.Message):
    __slots__ = ("bridge_id", "task", "labels", "fingerprint", "num_tokens", "d_wire", "sender_layer", "sender_digest", "receiver_digest")
    BRIDGE_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    D_WIRE_FIELD_NUMBER: _ClassVar[int]
    SENDER_LAYER_FIELD_NUMBER: _ClassVar[int]
    SENDER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    bridge_id: str
    task: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    fingerprint: str
    num_tokens: int
    d_wire: int
    sender_layer: int
    sender_digest: str
    receiver_digest: str
    def __init__(self, bridge_id: _Optional[str] = ..., task: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., fingerprint: _Optional[str] = ..., num_tokens: _Optional[int] = ..., d_wire: _Optional[int] = ..., sender_layer: _Optional[int] = ..., sender_digest: _Optional[str] = ..., receiver_digest: _Optional[str] = ...) -> None: ...

class TaskInfo(_message.Message):
    __slots__ = ("name", "labels", "bridge")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    bridge: bool
    def __init__(self, name: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., bridge: _Optional[bool] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_batch_size", "max_queue_size", "max_text_chars", "max_message_bytes", "max_relay_tokens", "max_queue_delay_ms")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_RELAY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_queue_size: int
    max_text_chars: int
    max_message_bytes: int
    max_relay_tokens: int
    max_queue_delay_ms: float
    def __init__(self, max_batch_size: _Optional[int] = ..., max_queue_size: _Optional[int] = ..., max_text_chars: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_relay_tokens: _Optional[int] = ..., max_queue_delay_ms: _Optional[float] = ...) -> None: ...
