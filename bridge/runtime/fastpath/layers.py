"""Fused layers: the 4-D causal masks handed to HF layers, and `decoder_block`, our own Llama/Mistral prefill
layer over the model's weights (fused QKV and gate/up GEMMs, residual adds in the GEMM epilogue, flash attention),
under torch.compile with an eager fallback; `fused_decoder` builds the stack once per model."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.runtime.fastpath.config import FastPathConfig

log = logging.getLogger(__name__)


def attention_masks(config: Any, q_pos: torch.Tensor, kv_len: int) -> torch.Tensor | dict[str, torch.Tensor]:
    """Boolean 4-D causal mask [1, 1, Q, kv_len] (True = attend) for queries at positions q_pos [Q].

    transformers returns a 4-D mask unchanged (no host syncs, same kernels eager and captured). Models with
    sliding-window layers get the window applied where it matters; models mixing layer types (Gemma 3) get
    the {layer type: mask} mapping their forward accepts.
    """
    k = torch.arange(kv_len, device=q_pos.device)
    causal = (k[None, :] <= q_pos[:, None])[None, None]  # [1, 1, Q, kv]
    window = getattr(config, "sliding_window", None)
    types = set(getattr(config, "layer_types", None) or [])
    if not window or kv_len <= window or types == {"full_attention"}:
        return causal
    sliding = causal & ((q_pos[:, None] - k[None, :]) < window)[None, None]
    if not types or types == {"sliding_attention"}:
        return sliding
    if types <= {"full_attention", "sliding_attention"}:
        return {"full_attention": causal, "sliding_attention": sliding}
    raise NotImplementedError(f"fast path: unsupported layer types {sorted(types)}")


# ---- fused decoder (Llama / Mistral family) --------------------------------------------------------------------
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Exactly LlamaRMSNorm: normalise in float32, cast back, scale."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def decoder_block(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, wqkv: torch.Tensor, wo: torch.Tensor,
                  wgu: torch.Tensor, wdown: torch.Tensor, ln1: torch.Tensor, ln2: torch.Tensor, mask: torch.Tensor | None,
                  eps: float, nh: int, nkv: int, hd: int, scale: float, gqa: bool) -> torch.Tensor:
    """One Llama/Mistral decoder layer, x [B, T, H] → [B, T, H]; cos, sin [1, T, 1, hd]; mask None → causal.

    Same function as LlamaDecoderLayer (prefill, no KV cache) with 4 GEMMs instead of 7.
    """
    B, T, H = x.shape
    h = _rms_norm(x, ln1, eps)
    qkv = F.linear(h, wqkv).view(B, T, nh + 2 * nkv, hd)  # q, k and v heads from one GEMM
    qk = qkv[:, :, : nh + nkv]
    qk = qk * cos + _rotate_half(qk) * sin  # rotary on q and k at once
    q = qk[:, :, :nh].transpose(1, 2)  # [B, nh, T, hd]
    k = qk[:, :, nh:].transpose(1, 2)  # [B, nkv, T, hd]
    v = qkv[:, :, nh + nkv:].transpose(1, 2)  # [B, nkv, T, hd]
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa)
    x = torch.addmm(x.reshape(B * T, H), a.transpose(1, 2).reshape(B * T, nh * hd), wo.t())  # residual in the GEMM
    h = _rms_norm(x, ln2, eps)
    g, u = F.linear(h, wgu).chunk(2, dim=-1)  # gate and up from one GEMM
    return torch.addmm(x, F.silu(g) * u, wdown.t()).view(B, T, H)


class _MaybeCompiled:
    """`fn` under torch.compile (dynamic batch/length); after a compiler error outside capture it logs the error
    and runs `fn` eagerly from then on (a compiler failure must not take the fast path down)."""

    def __init__(self, fn: Callable[..., Any], name: str):
        self.eager, self.name, self.error = fn, name, None
        self.compiled = torch.compile(fn, dynamic=True, fullgraph=True)

    def __call__(self, *args: Any) -> Any:
        if self.error is None:
            try:
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise
                self.error = f"{self.name}: {type(exc).__name__}: {exc}"
                log.warning("torch.compile failed; running it uncompiled: %s", self.error)
        return self.eager(*args)


_DECODER_BLOCK: dict[str, _MaybeCompiled] = {}  # one compiled decoder_block for every layer of every model


def _compiled_block() -> _MaybeCompiled:
    if "fn" not in _DECODER_BLOCK:
        _DECODER_BLOCK["fn"] = _MaybeCompiled(decoder_block, "decoder layer")
    return _DECODER_BLOCK["fn"]


def supports_fused(lm: LanguageModel) -> bool:
    """Llama-style decoders only: bias-free q/k/v/o and gate/up/down, LlamaRMSNorm-style norms, SiLU, no q/k norms."""
    cfg = lm.model.config
    if cfg.model_type not in ("llama", "mistral") or getattr(cfg, "hidden_act", "silu") != "silu":
        return False
    for layer in lm.backbone.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(not isinstance(m, nn.Linear) or m.bias is not None for m in linears):
            return False
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return False
        if not all(hasattr(getattr(layer, n, None), "variance_epsilon") for n in ("input_layernorm", "post_attention_layernorm")):
            return False
    return hasattr(lm.backbone, "rotary_emb") and hasattr(lm.backbone.norm, "variance_epsilon")


def _fuse_rows(linears: list[nn.Linear]) -> torch.Tensor:
    """Concatenate the weights of linears sharing an input into one [ΣN, K] matrix; the modules keep views of it.

    The views are contiguous row blocks with the same values, so the HF forward (the eager reference) computes
    exactly what it computed before, and no weight is stored twice.
    """
    fused = nn.Parameter(torch.cat([m.weight.detach() for m in linears], dim=0), requires_grad=False)  # a Parameter:
    offset = 0  # torch.compile keeps parameter shapes static, only batch and length are dynamic
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(fused.data[offset:offset + n], requires_grad=False)
        offset += n
    return fused


class FusedDecoder:
    """The decoder stack of a Llama-family model run by `decoder_block` (weights shared with the HF model)."""

    def __init__(self, lm: LanguageModel):
        cfg, bb = lm.model.config, lm.backbone
        attn0 = bb.layers[0].self_attn
        self.lm, self.config = lm, cfg
        self.nh, self.nkv = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
        self.hd, self.scale = int(attn0.head_dim), float(attn0.scaling)
        self.layers = []
        for layer in bb.layers:
            a, m = layer.self_attn, layer.mlp
            wqkv = _fuse_rows([a.q_proj, a.k_proj, a.v_proj])
            wgu = _fuse_rows([m.gate_proj, m.up_proj])
            self.layers.append((wqkv, a.o_proj.weight, wgu, m.down_proj.weight, layer.input_layernorm.weight,
                                layer.post_attention_layernorm.weight, float(layer.input_layernorm.variance_epsilon)))

    def is_current(self) -> bool:
        """False once the model's weights were replaced (e.g. `model.to(dtype)`): then the fused copies are stale."""
        return all(
            layer.self_attn.q_proj.weight.data_ptr() == wqkv.data_ptr() and layer.mlp.gate_proj.weight.data_ptr() == wgu.data_ptr()
            for layer, (wqkv, _, wgu, *_rest) in zip(self.lm.backbone.layers, self.layers)
        )

    def __call__(self, ids: torch.Tensor | None = None, embeds: torch.Tensor | None = None, num_layers: int | None = None,
                 final_norm: bool = True, compile: bool = False) -> torch.Tensor:
        """ids [B, T] or embeds [B, T, H] → hidden states [B, T, H] after `num_layers` layers (+ the final norm)."""
        x = self.lm.backbone.embed_tokens(ids) if embeds is None else embeds
        B, T, _ = x.shape
        positions = torch.arange(T, device=x.device)
        cos, sin = self.lm.backbone.rotary_emb(x, positions[None])  # [1, T, hd] each, in x's dtype
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [1, T, 1, hd] for the [B, T, heads, hd] layout
        window = getattr(self.config, "sliding_window", None)
        mask = attention_masks(self.config, positions, T) if window and T > window else None  # None: is_causal
        layers = self.layers[: num_layers or len(self.layers)]
        block = _compiled_block() if compile else decoder_block  # falls back to decoder_block on a compiler error
        for wqkv, wo, wgu, wdown, ln1, ln2, eps in layers:
            x = block(x, cos, sin, wqkv, wo, wgu, wdown, ln1, ln2, mask, eps, self.nh, self.nkv, self.hd, self.scale,
                      self.nh != self.nkv)
        return self.lm.backbone.norm(x) if final_norm else x


_DECODERS: weakref.WeakKeyDictionary[nn.Module, FusedDecoder] = weakref.WeakKeyDictionary()


def fused_decoder(lm: LanguageModel, config: FastPathConfig) -> FusedDecoder | None:
    """The model's FusedDecoder (built once per model), or None when switched off or not a Llama-family model."""
    if not config.fused_layers or not supports_fused(lm):
        return None
    decoder = _DECODERS.get(lm.model)
    if decoder is None or not decoder.is_current():
        decoder = _DECODERS[lm.model] = FusedDecoder(lm)
    return decoder
