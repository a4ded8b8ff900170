"""The soft-token bridge: a Perceiver resampler split across the wire.

    sender states [B, T, Hs] ──BridgeEncoder (sender side)──▶ wire latents [B, K, d_wire]
                                                               │ (codec: int8/bf16/… bytes over gRPC)
    wire latents [B, K, d_wire] ──BridgeAdapter (receiver side)──▶ soft tokens [B, K, Hr]

The encoder: project the sender's hidden states to d_model, then `depth` pre-LN blocks in which K learned
latent queries cross-attend to the states (padding masked), self-attend among themselves and pass through a
4× GELU MLP, all residual. No positional encoding: the latents are a set, the states carry their own positions.
The adapter: LayerNorm (makes it blind to the per-token scale the wire quantizer picks), project to the
receiver's width, divide each token by its RMS and multiply by a learnable scale that starts at the median
RMS of the receiver's own input embeddings, so soft tokens arrive with the norm the receiver expects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BridgeConfig:
    sender_hidden: int  # width of the sender LLM's hidden states (SmolLM2-135M: 576)
    receiver_hidden: int  # width of the receiver LLM's input embeddings (Gemma-3-270m: 640)
    sender_layer: int = 24  # take the output of this decoder layer (1-based); 24 of 30 for SmolLM2
    num_latents: int = 16  # K soft tokens per request
    d_model: int = 512  # resampler width
    depth: int = 2  # perceiver blocks
    num_heads: int = 8  # attention heads in every block (d_model must divide evenly)
    ffn_mult: int = 4  # MLP hidden = ffn_mult × d_model
    d_wire: int = 512  # values per soft token on the wire; d_model means no wire projection
    dropout: float = 0.0  # attention/MLP dropout during training

    def __post_init__(self) -> None:
        for name in ("sender_hidden", "receiver_hidden", "sender_layer", "num_latents", "d_model", "depth",
                     "num_heads", "ffn_mult", "d_wire"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BridgeConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"BridgeConfig.d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if self.d_wire > self.d_model:
            raise ValueError(f"BridgeConfig.d_wire ({self.d_wire}) cannot exceed d_model ({self.d_model})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BridgeConfig.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BridgeConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown BridgeConfig fields: {sorted(unknown)}")
        return cls(**d)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        # x [B, Q, D] attends to context [B, S, D]; key_mask [B, S] bool, True = attend.
        B, Q, D = x.shape
        S = context.shape[1]
        h = self.num_heads
        q = self.q(x).view(B, Q, h, D // h).transpose(1, 2)  # [B, h, Q, Dh]
        k, v = self.kv(context).view(B, S, 2, h, D // h).permute(2, 0, 3, 1, 4)  # each [B, h, S, Dh]
        attn_mask = key_mask[:, None, None, :] if key_mask is not None else None  # [B, 1, 1, S]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, Q, D))


class PerceiverBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.norm_latents = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.cross = Attention(dim, num_heads, dropout)
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_mult * dim, dim))

    def forward(self, latents: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        # latents [B, K, D], context [B, T, D], key_mask [B, T] bool
        latents = latents + self.cross(self.norm_latents(latents), self.norm_context(context), key_mask)
        normed = self.norm_self(latents)
        latents = latents + self.self_attn(normed, normed)
        return latents + self.mlp(self.norm_mlp(latents))


class BridgeEncoder(nn.Module):
    """Sender side: hidden states [B, T, Hs] + mask [B, T] → wire latents [B, K, d_wire]."""

    def __init__(self, config: BridgeConfig):
        super().__init__()
        self.config = config
        self.in_proj = nn.Linear(config.sender_hidden, config.d_model)
        self.latents = nn.Parameter(torch.randn(config.num_latents, config.d_model) * 0.02)
        self.blocks = nn.ModuleList(
            PerceiverBlock(config.d_model, config.num_heads, config.ffn_mult, config.dropout) for _ in range(config.depth)
        )
        self.out_norm = nn.LayerNorm(config.d_model)
        self.to_wire = nn.Identity() if config.d_wire == config.d_model else nn.Linear(config.d_model, config.d_wire)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        context = self.in_proj(states.to(self.in_proj.weight.dtype))  # [B, T, D]
        latents = self.latents.unsqueeze(0).expand(states.shape[0], -1, -1)  # [B, K, D]
        key_mask = mask.bool()
        for block in self.blocks:
            latents = block(latents, context, key_mask)
        return self.to_wire(self.out_norm(latents))  # [B, K, d_wire]


class BridgeAdapter(nn.Module):
    """Receiver side: wire latents [B, K, d_wire] → soft tokens [B, K, Hr] with the receiver's embedding norm."""

    def __init__(self, config: BridgeConfig, target_rms: float = 1.0):
        super().__init__()
        self.config = config
        self.in_norm = nn.LayerNorm(config.d_wire)
        self.proj = nn.Linear(config.d_wire, config.receiver_hidden)
        self.scale = nn.Parameter(torch.tensor(float(target_rms)))

    def forward(self, wire: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.in_norm(wire.to(self.proj.weight.dtype)))  # [B, K, Hr]
        rms = x.pow(2).mean(dim=-1, keepdim=True).add(1e-6).sqrt()  # [B, K, 1]
        return x / rms * self.scale


class Bridge(nn.Module):
    """Encoder + adapter in one module, for training and in-process use (no wire in between)."""

    def __init__(self, config: BridgeConfig, target_rms: float = 1.0):
        super().__init__()
        self.config = config
        self.encoder = BridgeEncoder(config)
        self.adapter = BridgeAdapter(config, target_rms)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.encoder(states, mask))


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def wire_bytes(config: BridgeConfig, dtype: str) -> int:
    """Payload bytes per request on the wire (int8 adds one fp32 scale per soft token)."""
    per_value = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}[dtype]
    extra = 4 * config.num_latents if dtype == "int8" else 0
    return config.num_latents * config.d_wire * per_value + extra


__all__ = ["BridgeConfig", "BridgeEncoder", "BridgeAdapter", "Bridge", "parameter_count", "wire_bytes"]
