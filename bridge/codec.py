"""Wire codec: soft tokens ↔ bytes, the way KServe v2 `raw_input_contents` carries tensors.

A WireTensor is raw little-endian bytes + a dtype name + a shape (+ one fp32 scale per token for int8).
Nothing is pickled. `decode` validates everything a client controls and names the offending field.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from telepathy.contract import WIRE_DTYPES  # noqa: E402 - re-exported: the codec is where readers look

_BYTES_PER_VALUE = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
_NUMPY_VIEW = {"fp32": "<f4", "fp16": "<f2", "bf16": "<u2", "int8": "i1"}


class WireFormatError(ValueError):
    """Bad wire tensor; `field` names the part of the message that is wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class WireTensor:
    dtype: str  # one of WIRE_DTYPES
    shape: tuple[int, ...]  # (K, d_wire) for one request
    data: bytes  # prod(shape) values, little-endian
    scales: bytes = b""  # int8 only: shape[0] little-endian fp32 scales, one per token

    @property
    def nbytes(self) -> int:
        return len(self.data) + len(self.scales)


def wire_nbytes(dtype: str, num_tokens: int, d_wire: int) -> int:
    """WireTensor.nbytes of one request's [num_tokens, d_wire] soft tokens, without encoding them."""
    _check_dtype(dtype)
    return num_tokens * d_wire * _BYTES_PER_VALUE[dtype] + (4 * num_tokens if dtype == "int8" else 0)


def _check_dtype(dtype: str) -> None:
    if dtype not in WIRE_DTYPES:
        raise WireFormatError("dtype", f"unknown wire dtype {dtype!r}; expected one of {', '.join(WIRE_DTYPES)}")


def quantize(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [..., K, D] float → (values in the wire dtype, per-token fp32 scales [..., K] or None). Runs on x's device."""
    _check_dtype(dtype)
    x = x.detach()
    if dtype == "int8":
        scales = x.float().abs().amax(dim=-1).clamp(min=1e-12) / 127.0  # [..., K]
        q = torch.round(x.float() / scales.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
        return q, scales
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    return x.to(torch_dtype), None


def _to_bytes(t: torch.Tensor, dtype: str) -> bytes:
    t = t.contiguous().cpu()
    if dtype == "bf16":
        t = t.view(torch.int16)  # numpy has no bf16; ship the raw 16-bit patterns
    return t.numpy().astype(_NUMPY_VIEW[dtype], copy=False).tobytes()


def encode_batch(x: torch.Tensor, dtype: str) -> list[WireTensor]:
    """x [B, K, D] → B WireTensors, one device→host copy for the whole batch."""
    if x.dim() != 3:
        raise ValueError(f"encode_batch expects [B, K, D], got shape {tuple(x.shape)}")
    q, scales = quantize(x, dtype)
    q = q.cpu()
    scales = scales.cpu() if scales is not None else None
    shape = tuple(int(s) for s in x.shape[1:])
    return [
        WireTensor(dtype, shape, _to_bytes(q[i], dtype), _to_bytes(scales[i], "fp32") if scales is not None else b"")
        for i in range(x.shape[0])
    ]


def encode(x: torch.Tensor, dtype: str) -> WireTensor:
    """x [K, D] → one WireTensor."""
    return encode_batch(x.unsqueeze(0), dtype)[0]


def decode(w: WireTensor, expected_shape: tuple[int, int] | None = None, max_values: int = 1 << 20) -> torch.Tensor:
    """WireTensor → float32 [K, D] on the CPU, after checking dtype, shape, byte length and finiteness."""
    _check_dtype(w.dtype)
    shape = tuple(w.shape)
    if len(shape) != 2 or any((not isinstance(s, int)) or s <= 0 for s in shape):
        raise WireFormatError("shape", f"expected 2 positive dimensions [tokens, width], got {list(shape)}")
    if expected_shape is not None and shape != tuple(expected_shape):
        raise WireFormatError("shape", f"expected {list(expected_shape)} for this bridge, got {list(shape)}")
    n = shape[0] * shape[1]
    if n > max_values:
        raise WireFormatError("shape", f"{n} values exceed the limit of {max_values}")
    want = n * _BYTES_PER_VALUE[w.dtype]
    if len(w.data) != want:
        raise WireFormatError("data", f"expected {want} bytes for {w.dtype} {list(shape)}, got {len(w.data)}")
    values = np.frombuffer(w.data, dtype=_NUMPY_VIEW[w.dtype]).reshape(shape)
    if w.dtype == "int8":
        if len(w.scales) != 4 * shape[0]:
            raise WireFormatError("scales", f"int8 needs {shape[0]} fp32 scales ({4 * shape[0]} bytes), got {len(w.scales)} bytes")
        scales = np.frombuffer(w.scales, dtype="<f4")
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise WireFormatError("scales", "scales must be finite and non-negative")
        out = torch.from_numpy(values.astype(np.float32) * scales[:, None])
    else:
        if w.scales:
            raise WireFormatError("scales", f"scales are only allowed with int8, got {len(w.scales)} bytes for {w.dtype}")
        if w.dtype == "bf16":
            out = torch.from_numpy(values.astype(np.int16)).view(torch.bfloat16).float()
        else:
            out = torch.from_numpy(values.astype(np.float32))
    if not torch.isfinite(out).all():
        raise WireFormatError("data", "values must be finite (found NaN or Inf)")
    return out


def decode_batch(items: list[WireTensor], expected_shape: tuple[int, int] | None = None) -> torch.Tensor:
    """B WireTensors of one shape → float32 [B, K, D]."""
    return torch.stack([decode(w, expected_shape) for w in items])
