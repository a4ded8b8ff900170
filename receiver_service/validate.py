"""Checks on incoming soft tokens, in the order that gives the most useful error:
identifiers (INVALID_ARGUMENT: length, control characters) → task / bridge (NOT_FOUND) → fingerprint
(FAILED_PRECONDITION, both fingerprints named) → tensor (INVALID_ARGUMENT: rank, dtype, shape vs the bridge, byte
lengths, int8 scales, NaN/Inf; bridge.codec.decode).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import torch

from telepathy.bridge.codec import WireFormatError, decode
from telepathy.bridge.runtime.engine import BridgeNotFoundError, BridgeSet, LoadedBridge
from telepathy.protos.v1 import common_pb2
from telepathy.serving.checks import check_id, require_task
from telepathy.serving.convert import tensor_from_pb
from telepathy.serving.errors import ServiceError, clip, invalid

# codec field → protobuf field of common.Tensor
_TENSOR_FIELDS = {"dtype": "dtype", "shape": "shape", "data": "raw_data", "scales": "scales"}
_ID_FIELDS = ("request_id", "task", "bridge_id", "bridge_fingerprint")


@dataclass
class SoftTokenInput:
    bridge: LoadedBridge
    latents: torch.Tensor  # [K, d_wire] float32, CPU


def _resolve(st: common_pb2.SoftTokens, bridges: BridgeSet, prefix: str) -> LoadedBridge:
    if st.task or not st.bridge_id:  # a bridge_id alone is enough; a task, when given, must exist
        require_task(st.task, bridges.tasks, f"{prefix}.task")
    try:
        return bridges.resolve(st.task, st.bridge_id)
    except BridgeNotFoundError as exc:
        field = f"{prefix}.bridge_id" if st.bridge_id else f"{prefix}.task"
        raise ServiceError(grpc.StatusCode.NOT_FOUND, f"{field}: {exc}", field) from None


def check_soft_tokens(st: common_pb2.SoftTokens, bridges: BridgeSet, prefix: str = "soft_tokens") -> SoftTokenInput:
    for name in _ID_FIELDS:
        check_id(getattr(st, name), f"{prefix}.{name}")
    bridge = _resolve(st, bridges, prefix)
    meta = bridge.meta
    field = f"{prefix}.bridge_fingerprint"
    if not st.bridge_fingerprint:
        raise invalid(field, f"is required (bridge {meta.bridge_id} expects {meta.fingerprint}; see ListBridges)")
    if st.bridge_fingerprint != meta.fingerprint:
        raise ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{field}: the soft tokens were made by bridge fingerprint {clip(st.bridge_fingerprint)}, but this receiver's "
            f"bridge {meta.bridge_id} for task {meta.task!r} has fingerprint {meta.fingerprint}; sender and receiver "
            "must load the same bridge checkpoint",
            field,
        )
    if not st.HasField("tokens"):
        raise invalid(f"{prefix}.tokens", "is required")
    try:
        latents = decode(tensor_from_pb(st.tokens), expected_shape=(meta.config.num_latents, meta.config.d_wire))
    except WireFormatError as exc:
        where = f"{prefix}.tokens.{_TENSOR_FIELDS.get(exc.field, exc.field)}"
        raise invalid(where, str(exc).removeprefix(f"{exc.field}: ")) from None
    return SoftTokenInput(bridge, latents)
