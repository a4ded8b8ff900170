"""What the agent SDK hands back: classifications, relay results, soft tokens (torch-free; torch only in from_latents)."""

from __future__ import annotations

from dataclasses import dataclass, field

from telepathy.protos.v1 import common_pb2, sender_pb2

DTYPES = {"fp32": common_pb2.DTYPE_FP32, "fp16": common_pb2.DTYPE_FP16, "bf16": common_pb2.DTYPE_BF16,
          "int8": common_pb2.DTYPE_INT8}
PATHS = {"bridge": sender_pb2.PATH_BRIDGE, "text": sender_pb2.PATH_TEXT}


def wire_dtype_pb(wire_dtype: str | None) -> int:
    return DTYPES[wire_dtype] if wire_dtype else common_pb2.DTYPE_UNSPECIFIED


@dataclass(frozen=True)
class Classification:
    request_id: str
    task: str
    label: str
    label_index: int
    scores: dict[str, float]  # every label → its probability, in label order (the HTTP API's `scores`)
    timings_us: dict[str, int]
    bridge_id: str = ""

    @classmethod
    def from_pb(cls, r: common_pb2.ClassifyResult) -> Classification:
        return cls(r.request_id, r.task, r.label, r.label_index, {s.label: s.probability for s in r.scores},
                   dict(r.timings_us), r.bridge_id)


@dataclass(frozen=True)
class RelayResult(Classification):
    path: str = "bridge"
    wire_bytes: int = 0
    relay_text: str = ""


@dataclass(frozen=True)
class SoftTokens:
    """K soft tokens addressed to one bridge: what agents hand each other. `tokens` is the wire Tensor."""

    task: str
    bridge_id: str
    fingerprint: str
    tokens: common_pb2.Tensor = field(repr=False)
    request_id: str = ""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tokens.shape)

    @property
    def nbytes(self) -> int:
        return len(self.tokens.raw_data) + len(self.tokens.scales)

    def to_pb(self) -> common_pb2.SoftTokens:
        return common_pb2.SoftTokens(request_id=self.request_id, task=self.task, bridge_id=self.bridge_id,
                                     bridge_fingerprint=self.fingerprint, tokens=self.tokens)

    @classmethod
    def from_pb(cls, st: common_pb2.SoftTokens) -> SoftTokens:
        return cls(st.task, st.bridge_id, st.bridge_fingerprint, st.tokens, st.request_id)

    @classmethod
    def from_latents(cls, latents, task: str, fingerprint: str, bridge_id: str = "", wire_dtype: str = "int8") -> SoftTokens:
        """An agent's own bridge-encoder output [K, d_wire] (torch tensor) → SoftTokens (quantized like the sender)."""
        from telepathy.bridge.codec import encode  # torch only for agents that bring their own tensors

        w = encode(latents, wire_dtype)
        return cls(task, bridge_id, fingerprint, common_pb2.Tensor(dtype=DTYPES[w.dtype], shape=list(w.shape),
                                                                   raw_data=w.data, scales=w.scales))
