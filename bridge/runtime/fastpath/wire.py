"""The wire inside the fast path: device-side dequantize, byte-exact WireTensors from quantized tensors, and the
bridge encoder (+ quantize) and (dequantize +) adapter functions, compiled once per bridge module. Also the
process-wide compile caches, this module's and layers.py's: `release_caches`, `compile_error`."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from telepathy.bridge.codec import WireTensor, quantize
from telepathy.bridge.runtime.fastpath.layers import _DECODER_BLOCK, _DECODERS, _MaybeCompiled


def wire_tensors(values: torch.Tensor, scales: torch.Tensor | None, dtype: str) -> list[WireTensor]:
    """Quantized [B, K, D] (+ scales [B, K]) → B WireTensors, byte-identical to codec.encode_batch."""
    v = values.detach().contiguous().cpu()
    if dtype == "bf16":
        v = v.view(torch.int16)
    view = {"fp32": "<f4", "fp16": "<f2", "bf16": "<u2", "int8": "i1"}[dtype]
    arr = v.numpy().astype(view, copy=False)
    sc = scales.detach().contiguous().cpu().numpy().astype("<f4", copy=False) if scales is not None else None
    shape = tuple(int(s) for s in values.shape[1:])
    return [WireTensor(dtype, shape, arr[i].tobytes(), sc[i].tobytes() if sc is not None else b"") for i in range(v.shape[0])]


def dequantize(values: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """Device-side inverse of codec.quantize: values [B, K, D] (+ scales [B, K]) → float32 [B, K, D]."""
    out = values.float()
    return out * scales.float().unsqueeze(-1) if scales is not None else out


# bridge module → {(role, wire): compiled function}; weak, so unloading a bridge frees its compiled code too
_BRIDGE_FNS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _MaybeCompiled]] = weakref.WeakKeyDictionary()


def _bridge_fn(module: nn.Module, key: tuple, run: Callable[..., Any], compile: bool, name: str) -> Callable[..., Any]:
    """`run` itself, or its compiled version cached per (bridge module, key)."""
    if not compile:
        return run
    cached = _BRIDGE_FNS.setdefault(module, {})
    if key not in cached:
        cached[key] = _MaybeCompiled(run, name)
    return cached[key]


def encoder_fn(encoder: nn.Module, wire: str | None, compile: bool) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """(states [B, T, Hs], key_mask [B, T]) → quantize(encoder(...), wire), or (latents [B, K, d_wire], None)."""
    def run(states: torch.Tensor, key_mask: torch.Tensor):
        latents = encoder(states, key_mask)  # [B, K, d_wire]
        return quantize(latents, wire) if wire else (latents, None)

    return _bridge_fn(encoder, ("encoder", wire), run, compile, f"bridge encoder ({wire or 'float'})")


def adapter_fn(adapter: nn.Module, compile: bool) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """(values [B, K, d_wire], scales [B, K] | None) → soft tokens adapter(dequantize(...)) [B, K, Hr]."""
    def run(values: torch.Tensor, scales: torch.Tensor | None):
        return adapter(dequantize(values, scales))

    return _bridge_fn(adapter, ("adapter",), run, compile, "bridge adapter")


def release_caches() -> None:
    """Forget every fused decoder and compiled bridge function (e.g. before converting a model to another dtype).

    The HF modules keep their views of the fused weights, so the models still compute what they computed."""
    _DECODERS.clear()
    _BRIDGE_FNS.clear()


def compile_error() -> str | None:
    """Why torch.compile of the decoder layer or of a bridge was abandoned in this process (None: it was not)."""
    fns = [*_DECODER_BLOCK.values(), *(f for cached in _BRIDGE_FNS.values() for f in cached.values())]
    errors = [f.error for f in fns if f.error]
    return "; ".join(errors) or None
