"""Wire codec: round trips per dtype, error bounds, and every malformed input named by field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from telepathy.bridge.codec import WIRE_DTYPES, WireFormatError, WireTensor, decode, decode_batch, encode, encode_batch


@pytest.mark.parametrize("dtype,tol", [("fp32", 0.0), ("fp16", 1e-3), ("bf16", 8e-3), ("int8", 1e-2)])
def test_round_trip_relative_error(dtype, tol):
    x = torch.randn(8, 16, 64, generator=torch.Generator().manual_seed(1)) * 3.0
    y = decode_batch(encode_batch(x, dtype))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float((y - x).norm() / x.norm()) <= tol


def test_int8_bytes_and_scales():
    w = encode(torch.randn(16, 64), "int8")
    assert w.shape == (16, 64) and len(w.data) == 16 * 64 and len(w.scales) == 16 * 4 and w.nbytes == 1088


def test_bf16_is_little_endian_raw_bits():
    x = torch.tensor([[1.0, -2.0]])
    w = encode(x, "bf16")
    assert w.data == np.array([0x3F80, 0xC000], dtype="<u2").tobytes()


def test_zero_rows_survive_int8():
    x = torch.zeros(4, 8)
    assert torch.equal(decode(encode(x, "int8")), x)


def _good(dtype="fp32", k=4, d=8) -> WireTensor:
    return encode(torch.randn(k, d), dtype)


@pytest.mark.parametrize(
    "tensor,field,message",
    [
        (WireTensor("fp64", (4, 8), b"\0" * 256), "dtype", "unknown wire dtype 'fp64'"),
        (WireTensor("fp32", (32,), b"\0" * 128), "shape", "expected 2 positive dimensions"),
        (WireTensor("fp32", (4, 0), b""), "shape", "expected 2 positive dimensions"),
        (WireTensor("fp32", (4, 8), b"\0" * 127), "data", "expected 128 bytes for fp32 [4, 8], got 127"),
        (WireTensor("int8", (4, 8), b"\0" * 32, b"\0" * 15), "scales", "int8 needs 4 fp32 scales (16 bytes), got 15 bytes"),
        (WireTensor("fp16", (4, 8), b"\0" * 64, b"\0" * 16), "scales", "scales are only allowed with int8"),
        (WireTensor("fp32", (1, 2), np.array([1.0, np.nan], "<f4").tobytes()), "data", "values must be finite"),
        (WireTensor("fp32", (1, 2), np.array([np.inf, 0], "<f4").tobytes()), "data", "values must be finite"),
        (WireTensor("int8", (1, 2), b"\1\1", np.array([np.nan], "<f4").tobytes()), "scales", "finite and non-negative"),
        (WireTensor("int8", (1, 2), b"\1\1", np.array([-1.0], "<f4").tobytes()), "scales", "finite and non-negative"),
    ],
)
def test_malformed_tensors_name_the_field(tensor, field, message):
    with pytest.raises(WireFormatError) as err:
        decode(tensor)
    assert err.value.field == field
    assert message in str(err.value)
    # the codec is stateless: a good tensor still decodes afterwards
    assert decode(_good()).shape == (4, 8)


def test_expected_shape_and_size_cap():
    with pytest.raises(WireFormatError, match=r"shape: expected \[16, 64\] for this bridge, got \[4, 8\]"):
        decode(_good(), expected_shape=(16, 64))
    with pytest.raises(WireFormatError, match="exceed the limit"):
        decode(_good(k=4, d=8), max_values=16)


def test_all_dtypes_listed():
    assert set(WIRE_DTYPES) == {"fp32", "fp16", "bf16", "int8"}
