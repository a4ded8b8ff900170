"""protobuf ↔ bridge/ types: Tensor ↔ WireTensor, label probabilities → ClassifyResult, Info messages."""

from __future__ import annotations

from collections.abc import Sequence

from telepathy.bridge.checkpoint import BridgeMeta
from telepathy.bridge.codec import WireFormatError, WireTensor
from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.runtime.engine import BridgeSet
from telepathy.config import ServiceSettings
from telepathy.contract import MAX_SHAPE_DIMS, VERSION  # noqa: F401 - VERSION is re-exported for the servicers
from telepathy.protos.v1 import common_pb2
from telepathy.serving.errors import invalid

DTYPE_TO_PB = {
    "fp32": common_pb2.DTYPE_FP32,
    "fp16": common_pb2.DTYPE_FP16,
    "bf16": common_pb2.DTYPE_BF16,
    "int8": common_pb2.DTYPE_INT8,
}
PB_TO_DTYPE = {v: k for k, v in DTYPE_TO_PB.items()}


def wire_dtype_from_pb(value: int, default: str, field: str = "wire_dtype") -> str:
    """DTYPE_UNSPECIFIED → `default`; an unknown enum number → INVALID_ARGUMENT."""
    if value == common_pb2.DTYPE_UNSPECIFIED:
        return default
    if value not in PB_TO_DTYPE:
        raise invalid(field, f"unknown dtype enum value {value}; expected one of {', '.join(common_pb2.DType.keys()[1:])}")
    return PB_TO_DTYPE[value]


def tensor_to_pb(w: WireTensor) -> common_pb2.Tensor:
    return common_pb2.Tensor(dtype=DTYPE_TO_PB[w.dtype], shape=list(w.shape), raw_data=w.data, scales=w.scales)


def tensor_from_pb(t: common_pb2.Tensor) -> WireTensor:
    """No checks beyond the dtype enum and the rank: bridge.codec.decode validates shape, byte lengths and values
    (and quotes the shape in its messages, hence the rank limit first)."""
    if len(t.shape) > MAX_SHAPE_DIMS:
        raise WireFormatError("shape", f"has {len(t.shape)} dimensions; the limit is {MAX_SHAPE_DIMS}")
    if t.dtype not in PB_TO_DTYPE:
        name = common_pb2.DType.Name(t.dtype) if t.dtype in common_pb2.DType.values() else f"enum value {t.dtype}"
        raise WireFormatError("dtype", f"unsupported dtype {name}; expected one of {', '.join(common_pb2.DType.keys()[1:])}")
    return WireTensor(PB_TO_DTYPE[t.dtype], tuple(int(s) for s in t.shape), bytes(t.raw_data), bytes(t.scales))


def classify_result(request_id: str, task: str, labels: Sequence[str], probabilities: Sequence[float],
                    timings_us: dict[str, int], bridge_id: str = "") -> common_pb2.ClassifyResult:
    """One row of label probabilities [L] → ClassifyResult (label = argmax)."""
    best = max(range(len(probabilities)), key=lambda i: probabilities[i])
    return common_pb2.ClassifyResult(
        request_id=request_id, task=task, label=labels[best], label_index=best,
        scores=[common_pb2.LabelScore(label=label, probability=float(p)) for label, p in zip(labels, probabilities)],
        timings_us=timings_us, bridge_id=bridge_id,
    )


def micros(seconds: float) -> int:
    return max(0, int(round(seconds * 1e6)))


def model_info(lm: LanguageModel) -> common_pb2.ModelInfo:
    fp = lm.fingerprint()
    return common_pb2.ModelInfo(
        spec=lm.spec, architecture=fp.architecture, hidden_size=fp.hidden_size, num_layers=fp.num_layers,
        vocab_size=fp.vocab_size, digest=fp.digest, device=str(lm.device), dtype=str(lm.dtype).removeprefix("torch."),
    )


def bridge_info(meta: BridgeMeta) -> common_pb2.BridgeInfo:
    return common_pb2.BridgeInfo(
        bridge_id=meta.bridge_id, task=meta.task, labels=list(meta.labels), fingerprint=meta.fingerprint,
        num_tokens=meta.config.num_latents, d_wire=meta.config.d_wire, sender_layer=meta.config.sender_layer,
        sender_digest=meta.sender.digest, receiver_digest=meta.receiver.digest,
    )


def task_infos(bridges: BridgeSet) -> list[common_pb2.TaskInfo]:
    """Every task of a side's catalog (built-ins, then its bridges' tasks), and whether a bridge for it is loaded."""
    return [common_pb2.TaskInfo(name=name, labels=list(spec.labels), bridge=name in bridges.by_task)
            for name, spec in bridges.tasks.items()]


def limits(settings: ServiceSettings, max_relay_tokens: int = 0) -> common_pb2.Limits:
    return common_pb2.Limits(
        max_batch_size=settings.max_batch_size, max_queue_size=settings.max_queue_size,
        max_text_chars=settings.max_text_chars, max_message_bytes=settings.max_message_bytes,
        max_relay_tokens=max_relay_tokens, max_queue_delay_ms=settings.max_queue_delay_ms,
    )
