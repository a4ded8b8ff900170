"""Fast path: static shapes, fused layers and CUDA graphs for both sides of the bridge.

The eager engines (bridge/engine.py) are the reference; this module computes the same function with the
launch overhead taken out, so that a batch-1 request costs about what reading the weights costs:

    sender   ids [Bb, Tb] (right-padded) + lengths [Bb]
               ─▶ embed ─▶ decoder layers 1..L only (no final norm, no LM head)       states [Bb, Tb, Hs]
               ─▶ BridgeEncoder (cross-attention keys masked by `lengths`)           latents [Bb, K, d_wire]
               ─▶ codec.quantize (int8 + one fp32 scale per token, on the device)    values [Bb, K, d_wire], scales [Bb, K]
    receiver values, scales ─▶ dequantize ─▶ BridgeAdapter                            soft [Bb, K, Hr]
               ─▶ [BOS + primer | soft | answer prefix] (prefix/suffix embedded once)  embeds [Bb, P+K+S, Hr]
               ─▶ all decoder layers + final norm, last position only                 h [Bb, Hr]
               ─▶ h @ W_label[L, Hr]ᵀ (label rows of the LM head only) ─▶ softmax      probs [Bb, L]

Every shape is static: batches are padded up to a batch bucket (Bb), sender texts up to a length bucket (Tb),
and the receiver input has a fixed length per bridge. Each (bridge, Bb, Tb) gets pre-allocated input buffers
and, on CUDA, one captured CUDA graph; a call copies its inputs into the buffers, replays the graph and
copies the real rows out. Nothing in the forward path reads a device value on the host (no `.item()`, no
data-dependent Python branches). With right padding and a causal model, real tokens never attend to pads, so
pads change nothing but the pad rows themselves, which the encoder's key mask (sender) or the last-real-token
gather (receiver text path) drops; attention is therefore plain causal.

Llama-family decoders (Llama, Mistral, SmolLM2) run `decoder_block`, our own prefill layer over the same
weights: one QKV GEMM and one gate/up GEMM (the HF modules keep views of the fused matrices), residual adds in
the GEMM epilogue, flash attention with `is_causal` and native GQA, and — on CUDA — `torch.compile` of that one
function, shared by every layer of both models. Other architectures (Gemma 3) run the HF layers with a 4-D
causal mask built here: transformers returns a 4-D mask as-is, so its mask helpers, which sync on a 2-D
padding mask, never run.

On the CPU (or with `cuda_graphs=False`) the very same static-shape functions run eagerly: that is what the
CPU parity tests exercise. `RelayGenerator` applies graphs to the text-relay baseline too (static KV cache,
prefill and each greedy decode step one graph, HF layers). Measured results: docs/PERFORMANCE.md.

Services use `SenderFastPath.encode_quantized` / `ReceiverFastPath.classify_quantized` (or the engine-shaped
`encode` / `classify_latents`); in-process callers use `FastPipeline.classify_batch(texts, task)`.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from telepathy.bridge.codec import WIRE_DTYPES, WireTensor, decode_batch, quantize
from telepathy.bridge.runtime.engine import ReceiverEngine, SenderEngine
from telepathy.bridge.lm import LanguageModel, length_bucket
from telepathy.bridge.tasks import get_task

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class FastPathConfig:
    """Switches for each optimisation (all on by default); every one can be turned off for ablations."""

    cuda_graphs: bool = True  # capture one CUDA graph per static shape and replay it (CUDA only; elsewhere the
    #                           same static-shape code runs eagerly)
    length_buckets: bool = True  # pad sender/receiver-text lengths up to a power of two ≥ 16 (few graphs);
    #                              False: one shape per exact length (a graph per distinct length)
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # batches are padded up to one of these;
    #                                                             larger batches are split into chunks
    fused_layers: bool = True  # Llama/Mistral-family decoders run our own layer code over the same weights: QKV and
    #                            gate/up projections fused into one GEMM each (the HF modules keep views of them),
    #                            residual adds in the GEMM epilogue, flash attention (is_causal, native GQA); other
    #                            architectures (Gemma 3, …) keep the HF forward
    compile_layers: bool = True  # torch.compile that layer function (CUDA only): one compile shared by every layer
    #                              of both models (dynamic shapes); norm, rotary and SiLU·up become single kernels
    compile_bridge: bool = True  # torch.compile the bridge encoder + wire quantise (sender) and the dequantise +
    #                              adapter (receiver) (CUDA only): their ~50 small LayerNorm / attention / GELU
    #                              kernels fuse into fewer
    stop_at_layer: bool = True  # sender runs decoder layers 1..L only; False runs the whole model with
    #                             output_hidden_states and full-vocabulary logits (the naive research path)
    label_only_logits: bool = True  # receiver multiplies only the L label rows at the last position; False
    #                                 computes full-vocabulary logits at every position and picks them after
    dtype: str = "auto"  # dtype the LLMs must be loaded in: "auto" (bf16 on CUDA, fp32 on CPU), "bf16",
    #                      "fp16" or "fp32"; the fast path checks it, loaders use `torch_dtype(device)`
    wire_dtype: str = "int8"  # codec run inside the graphs by encode_quantized / classify_quantized
    max_graphs: int = 128  # captured graphs per side; shapes beyond this run the static code eagerly (a service
    #                        warms batch buckets × lengths 16–128 per bridge: 24 graphs a bridge at max batch 32)

    def __post_init__(self) -> None:
        for name in ("cuda_graphs", "length_buckets", "fused_layers", "compile_layers", "compile_bridge", "stop_at_layer",
                     "label_only_logits"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"FastPathConfig.{name} must be a bool, got {getattr(self, name)!r}")
        buckets = tuple(self.batch_buckets)
        if not buckets or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in buckets):
            raise ValueError(f"FastPathConfig.batch_buckets must be positive integers, got {self.batch_buckets!r}")
        if list(buckets) != sorted(set(buckets)):
            raise ValueError(f"FastPathConfig.batch_buckets must be strictly increasing, got {self.batch_buckets!r}")
        self.batch_buckets = buckets
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"FastPathConfig.dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"FastPathConfig.wire_dtype must be one of {WIRE_DTYPES}, got {self.wire_dtype!r}")
        if not isinstance(self.max_graphs, int) or self.max_graphs < 0:
            raise ValueError(f"FastPathConfig.max_graphs must be a non-negative integer, got {self.max_graphs!r}")

    @property
    def max_batch(self) -> int:
        return self.batch_buckets[-1]

    def buckets_upto(self, batch_size: int) -> tuple[int, ...]:
        """The batch buckets that batches of 1..batch_size land in (what a service warms up)."""
        b = self.batch_buckets
        return tuple(x for i, x in enumerate(b) if i == 0 or b[i - 1] < batch_size)

    def torch_dtype(self, device: str | torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
        return _DTYPES[self.dtype]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["batch_buckets"] = list(self.batch_buckets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FastPathConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown FastPathConfig fields: {sorted(unknown)}")
        d = dict(d)
        if "batch_buckets" in d:
            d["batch_buckets"] = tuple(d["batch_buckets"])
        return cls(**d)

    # ---- command line / service settings -------------------------------------------------------------------
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, prefix: str = "") -> None:
        """--no-cuda-graphs, --no-fused-layers, …, --dtype; `prefix` (e.g. "fast-") avoids clashes with a service's own flags."""
        g = parser.add_argument_group("fast path (each optimisation can be turned off)")
        for name, help_ in (("cuda-graphs", "run the static-shape code eagerly"), ("length-buckets", "exact lengths (a graph each)"),
                            ("fused-layers", "HF decoder layers"), ("compile-layers", "no torch.compile of the layers"),
                            ("compile-bridge", "no torch.compile of the bridge encoder / adapter"),
                            ("stop-at-layer", "run the whole sender model"),
                            ("label-only-logits", "full-vocabulary logits at every receiver position")):
            g.add_argument(f"--{prefix}no-{name}", dest="fp_" + name.replace("-", "_"), action="store_false", help=help_)
        g.add_argument(f"--{prefix}batch-buckets", dest="fp_batch_buckets", default="1,2,4,8,16,32,64", help="comma-separated")
        g.add_argument(f"--{prefix}dtype", dest="fp_dtype", default="auto", choices=["auto", *_DTYPES])
        g.add_argument(f"--{prefix}wire-dtype", dest="fp_wire_dtype", default="int8", choices=list(WIRE_DTYPES))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "FastPathConfig":
        return cls(
            cuda_graphs=args.fp_cuda_graphs, length_buckets=args.fp_length_buckets, fused_layers=args.fp_fused_layers,
            compile_layers=args.fp_compile_layers, compile_bridge=args.fp_compile_bridge, stop_at_layer=args.fp_stop_at_layer,
            label_only_logits=args.fp_label_only_logits,
            batch_buckets=tuple(int(b) for b in str(args.fp_batch_buckets).split(",") if b.strip()),
            dtype=args.fp_dtype, wire_dtype=args.fp_wire_dtype,
        )

    @classmethod
    def from_env(cls, environ: dict[str, str], prefix: str = "TELEPATHY_FASTPATH_") -> "FastPathConfig":
        """Service settings: TELEPATHY_FASTPATH_CUDA_GRAPHS=0, …_BATCH_BUCKETS=1,8,32, …_DTYPE=bf16 (unset: default)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(prefix + f.name.upper())
            if raw is None:
                continue
            default = getattr(cls(), f.name)
            if isinstance(default, bool):
                low = raw.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(f"{prefix}{f.name.upper()} must be a boolean (1/0, true/false, on/off), got {raw!r}")
                values[f.name] = low in ("1", "true", "yes", "on")
            elif isinstance(default, tuple):
                values[f.name] = tuple(int(x) for x in raw.split(",") if x.strip())
            elif isinstance(default, int):
                values[f.name] = int(raw)
            else:
                values[f.name] = raw.strip()
        return cls(**values)


# ---- helpers ------------------------------------------------------------------------------------------------
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


def _pick_bucket(n: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if b >= n:
            return b
    return buckets[-1]


def _check_dtype(lm: LanguageModel, config: FastPathConfig) -> None:
    if config.dtype != "auto" and lm.dtype != config.torch_dtype(lm.device):
        raise ValueError(
            f"fast path configured for {config.dtype} but {lm.spec} is loaded in {lm.dtype}; load it with "
            f"dtype=FastPathConfig.torch_dtype(device)"
        )


_SIDE_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}  # per GPU: warm-up and capture of every StaticRunner


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


class StaticRunner:
    """`fn(**inputs)` over fixed input buffers; with `graph=True` (CUDA) it is captured once and replayed.

    Outputs are static tensors too: they are overwritten by the next run, so copy out what you keep.
    """

    def __init__(self, fn: Callable[..., Any], inputs: dict[str, torch.Tensor], graph: bool, pool: Any = None, warmup: int = 2,
                 device: torch.device | None = None):
        self.fn, self.inputs, self.graph = fn, inputs, None
        self.device = device if device is not None else next(iter(inputs.values())).device
        if graph:
            # Streams, capture and replay belong to the inputs' GPU, which need not be the current one (a sender on
            # cuda:0 and a receiver on cuda:1 in one process): without this the capture runs on cuda:0's stream.
            with torch.cuda.device(self.device):
                # Warm up on a side stream of this GPU (lazy inits, cuBLAS workspaces, kernel selection), then
                # capture on that same stream. torch.cuda.graph's own default capture stream is made once per
                # process, on whichever GPU was current then: a second GPU's capture must not use it.
                side = _side_stream(self.device)
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), torch.no_grad():
                    for _ in range(warmup):
                        fn(**inputs)
                torch.cuda.current_stream().wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.no_grad(), torch.cuda.graph(self.graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                    self.outputs = fn(**inputs)

    @torch.no_grad()
    def run(self) -> Any:
        if self.graph is None:
            return self.fn(**self.inputs)
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.outputs


class _RunnerCache:
    """Runners keyed by static shape; at most `max_graphs` of them are captured graphs."""

    def __init__(self, device: torch.device, config: FastPathConfig):
        self.device = device
        self.use_graphs = config.cuda_graphs and device.type == "cuda"
        self.max_graphs = config.max_graphs
        if self.use_graphs:
            with torch.cuda.device(device):
                self.pool = torch.cuda.graph_pool_handle()
        else:
            self.pool = None
        self.runners: dict[tuple, StaticRunner] = {}
        self.graphs = 0

    def get(self, key: tuple, build: Callable[[], tuple[Callable[..., Any], dict[str, torch.Tensor]]]) -> StaticRunner:
        runner = self.runners.get(key)
        if runner is None:
            fn, inputs = build()
            graph = self.use_graphs and self.graphs < self.max_graphs
            if self.use_graphs and not graph:
                log.warning("fast path: %d graphs captured; shape %s runs without a graph", self.graphs, key)
            runner = StaticRunner(fn, inputs, graph=graph, pool=self.pool, device=self.device)
            self.graphs += int(graph)
            self.runners[key] = runner
        return runner


def _stage(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor → device, asynchronously from pinned memory (PyTorch's pinned cache tracks the copy)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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


_DECODERS: "weakref.WeakKeyDictionary[nn.Module, FusedDecoder]" = weakref.WeakKeyDictionary()


def fused_decoder(lm: LanguageModel, config: FastPathConfig) -> FusedDecoder | None:
    """The model's FusedDecoder (built once per model), or None when switched off or not a Llama-family model."""
    if not config.fused_layers or not supports_fused(lm):
        return None
    decoder = _DECODERS.get(lm.model)
    if decoder is None or not decoder.is_current():
        decoder = _DECODERS[lm.model] = FusedDecoder(lm)
    return decoder


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


# bridge module → {(role, wire): compiled function}; weak, so unloading a bridge frees its compiled code too
_BRIDGE_FNS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, _MaybeCompiled]]" = weakref.WeakKeyDictionary()


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


class _FastSide:
    """What both sides hold: the engine and its model, the config, the runners of their static shapes, one lock."""

    def __init__(self, engine: SenderEngine | ReceiverEngine, config: FastPathConfig | None = None):
        self.engine, self.lm = engine, engine.lm
        self.config = config or FastPathConfig()
        self.device = self.lm.device
        _check_dtype(self.lm, self.config)
        self.pad_id = int(self.lm.tokenizer.pad_token_id)
        self._runners = _RunnerCache(self.device, self.config)
        self._lock = threading.Lock()


# ---- sender -------------------------------------------------------------------------------------------------
class SenderFastPath(_FastSide):
    """SenderEngine's `encode`, with static shapes and CUDA graphs. Thread-safe (one replay at a time)."""

    # shapes
    def length_for(self, n: int) -> int:
        cap = self.engine.max_text_tokens
        return length_bucket(n, cap) if self.config.length_buckets else min(max(n, 1), cap)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts → right-padded ids [B, T] and lengths [B], both on the CPU (no device round trip)."""
        enc = self.lm.tokenizer(texts, padding="longest", truncation=True, max_length=self.engine.max_text_tokens,
                                return_tensors="pt", padding_side="right")
        return enc["input_ids"], enc["attention_mask"].sum(dim=1)

    def _build(self, bridge_id: str, batch: int, length: int, wire: str | None):
        bridge = self.engine.bridges.resolve("", bridge_id)
        encoder, layer = bridge.module, bridge.meta.config.sender_layer
        lm, config, stop = self.lm, self.lm.model.config, self.config.stop_at_layer
        fused, compile_ = fused_decoder(lm, self.config), self.config.compile_layers and self.device.type == "cuda"
        encode = encoder_fn(encoder, wire, self.config.compile_bridge and self.device.type == "cuda")
        inputs = {
            "ids": torch.full((batch, length), self.pad_id, dtype=torch.long, device=self.device),  # [Bb, Tb]
            "lengths": torch.ones(batch, dtype=torch.long, device=self.device),  # [Bb]; pad rows keep 1 key
        }

        def forward(ids: torch.Tensor, lengths: torch.Tensor):
            positions = torch.arange(length, device=ids.device)  # [Tb]
            if stop and fused is not None:
                states = fused(ids=ids, num_layers=layer, final_norm=False, compile=compile_)  # [Bb, Tb, Hs]
            elif stop:
                states = lm.hidden_states(ids, attention_masks(config, positions, length), layer)  # layers 1..L, no norm
            else:
                mask = attention_masks(config, positions, length)
                out = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
                states = out.hidden_states[layer]  # same tensor, after running every layer and the LM head
            key_mask = positions[None, :] < lengths[:, None]  # [Bb, Tb]
            return encode(states, key_mask)  # int8 values [Bb, K, d_wire] + scales [Bb, K], or (latents, None)

        return forward, inputs

    def encode_ids(self, ids: torch.Tensor, lengths: torch.Tensor, task: str = "", bridge_id: str = "",
                   wire: str | None = None):
        """ids [B, T] right-padded + lengths [B] → (latents or quantized values [B, K, d_wire], scales [B, K] | None, meta).

        wire=None gives float latents in the model dtype (like SenderEngine.encode); a wire dtype gives
        codec.quantize's output computed inside the graph.
        """
        meta = self.engine.bridges.resolve(task, bridge_id).meta
        B, T = ids.shape
        if B == 0 or T == 0:
            raise ValueError(f"encode_ids needs at least one token of one text, got ids of shape {tuple(ids.shape)}")
        Tb = self.length_for(T)
        if T > Tb:  # longer than max_text_tokens: truncate like the tokenizer would
            ids, lengths, T = ids[:, :Tb], lengths.clamp(max=Tb), Tb
        values, scales = [], []
        with self._lock:
            for start in range(0, B, self.config.max_batch):
                chunk_ids, chunk_len = ids[start:start + self.config.max_batch], lengths[start:start + self.config.max_batch]
                n = chunk_ids.shape[0]
                Bb = _pick_bucket(n, self.config.batch_buckets)
                runner = self._runners.get((meta.bridge_id, Bb, Tb, wire), lambda: self._build(meta.bridge_id, Bb, Tb, wire))
                buf_ids, buf_len = runner.inputs["ids"], runner.inputs["lengths"]
                if n < Bb or T < Tb:  # stale rows/columns are harmless (causal + key mask); reset them anyway
                    buf_ids.fill_(self.pad_id)
                    buf_len.fill_(1)
                buf_ids[:n, :T].copy_(_stage(chunk_ids, self.device), non_blocking=True)
                buf_len[:n].copy_(_stage(chunk_len, self.device), non_blocking=True)
                v, s = runner.run()
                values.append(v[:n].clone())
                scales.append(s[:n].clone() if s is not None else None)
        v = torch.cat(values) if len(values) > 1 else values[0]
        s = None if scales[0] is None else (torch.cat(scales) if len(scales) > 1 else scales[0])
        return v, s, meta

    @torch.no_grad()
    def encode(self, texts: list[str], task: str, bridge_id: str = ""):
        """Same contract as SenderEngine.encode: texts → wire latents [B, K, d_wire] on the device, meta."""
        ids, lengths = self.tokenize(texts)
        latents, _, meta = self.encode_ids(ids, lengths, task, bridge_id, wire=None)
        return latents, meta

    @torch.no_grad()
    def encode_quantized(self, texts: list[str], task: str, bridge_id: str = "", wire_dtype: str | None = None):
        """texts → (values [B, K, d_wire] in the wire dtype, scales [B, K] or None, meta), all on the device."""
        ids, lengths = self.tokenize(texts)
        return self.encode_ids(ids, lengths, task, bridge_id, wire=wire_dtype or self.config.wire_dtype)

    def encode_wire(self, texts: list[str], task: str, wire_dtype: str | None = None, bridge_id: str = ""):
        """Same contract as SenderEngine.encode_wire (bytes identical to codec.encode_batch)."""
        dtype = wire_dtype or self.config.wire_dtype
        values, scales, meta = self.encode_quantized(texts, task, bridge_id, dtype)
        return wire_tensors(values, scales, dtype), meta

    def warmup(self, task: str, batch_sizes: tuple[int, ...] = (1,), lengths: tuple[int, ...] = (64,),
               wire: str | None = "config", bridge_id: str = "") -> None:
        """Capture the graphs of these shapes now (services: at start-up, before reporting SERVING)."""
        wire = self.config.wire_dtype if wire == "config" else wire
        for b in batch_sizes:
            for t in lengths:
                ids = torch.full((b, t), self.pad_id, dtype=torch.long)
                self.encode_ids(ids, torch.full((b,), t, dtype=torch.long), task, bridge_id, wire=wire)


# ---- receiver -----------------------------------------------------------------------------------------------
class ReceiverFastPath(_FastSide):
    """ReceiverEngine's `classify_latents` / `classify_text`, with static shapes and CUDA graphs."""

    def __init__(self, engine: ReceiverEngine, config: FastPathConfig | None = None):
        super().__init__(engine, config)
        self._label_rows: dict[tuple[int, ...], torch.Tensor] = {}
        self._fused = fused_decoder(self.lm, self.config)
        self._compile = self.config.compile_layers and self.device.type == "cuda"

    def _label_weight(self, label_ids: torch.Tensor) -> torch.Tensor:
        """The L label rows of the LM head, float32 [L, H] (gathered once, outside any graph)."""
        key = tuple(int(i) for i in label_ids.cpu())
        if key not in self._label_rows:
            self._label_rows[key] = self.lm.model.get_output_embeddings().weight[label_ids].float()
        return self._label_rows[key]

    def _scores(self, embeds: torch.Tensor, last: torch.Tensor | None, label_ids: torch.Tensor, label_w: torch.Tensor):
        """embeds [B, T, H] → label probabilities [B, L] float32, reading the position `last` [B] (None: T-1)."""
        lm, (B, T, H) = self.lm, embeds.shape
        mask = None if self._fused is not None and self.config.label_only_logits else \
            attention_masks(lm.model.config, torch.arange(T, device=embeds.device), T)  # for the HF layers
        if self.config.label_only_logits:
            if self._fused is not None:
                hidden = self._fused(embeds=embeds, compile=self._compile)  # [B, T, H], final norm included
            else:
                hidden = lm.backbone(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
            h = hidden[:, -1] if last is None else hidden.gather(1, last.view(B, 1, 1).expand(B, 1, H)).squeeze(1)
            logits = h.float() @ label_w.T  # [B, L]
            softcap = getattr(lm.config, "final_logit_softcapping", None)
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
        else:
            full = lm.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits  # [B, T, V]
            row = full[:, -1] if last is None else full.gather(1, last.view(B, 1, 1).expand(B, 1, full.shape[-1])).squeeze(1)
            logits = row[:, label_ids].float()  # softcap (if any) applied by the model
        return logits.softmax(dim=-1)

    # bridge path
    def _build_latents(self, bridge_id: str, batch: int, wire: str | None):
        bridge = self.engine.bridges.resolve("", bridge_id)
        meta, adapter, cfg = bridge.meta, bridge.module, bridge.meta.config
        label_ids = self.lm.label_token_ids(tuple(meta.verbalizers))
        label_w = self._label_weight(label_ids)
        K, D = cfg.num_latents, cfg.d_wire
        values_dtype = {None: torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                        "int8": torch.int8}[wire]
        inputs = {"values": torch.zeros(batch, K, D, dtype=values_dtype, device=self.device)}  # [Bb, K, d_wire]
        if wire == "int8":
            inputs["scales"] = torch.zeros(batch, K, dtype=torch.float32, device=self.device)  # [Bb, K]
        self.engine.soft_inputs(meta, torch.zeros(1, K, cfg.receiver_hidden, dtype=self.lm.dtype, device=self.device))
        adapt = adapter_fn(adapter, self.config.compile_bridge and self.device.type == "cuda")

        def forward(values: torch.Tensor, scales: torch.Tensor | None = None):
            soft = adapt(values, scales)  # [Bb, K, Hr]
            embeds, _ = self.engine.soft_inputs(meta, soft)  # [Bb, P+K+S, Hr]; prefix/suffix embedded once
            return self._scores(embeds, None, label_ids, label_w)  # [Bb, L]

        return forward, inputs

    def _classify(self, values: torch.Tensor, scales: torch.Tensor | None, task: str, bridge_id: str, wire: str | None):
        meta = self.engine.bridges.resolve(task, bridge_id).meta
        B, out = values.shape[0], []
        with self._lock:
            for start in range(0, B, self.config.max_batch):
                v = values[start:start + self.config.max_batch]
                n = v.shape[0]
                Bb = _pick_bucket(n, self.config.batch_buckets)
                runner = self._runners.get(("latents", meta.bridge_id, Bb, wire), lambda: self._build_latents(meta.bridge_id, Bb, wire))
                runner.inputs["values"][:n].copy_(_stage(v, self.device), non_blocking=True)
                if scales is not None:
                    runner.inputs["scales"][:n].copy_(_stage(scales[start:start + n], self.device), non_blocking=True)
                out.append(runner.run()[:n].clone())
        return (torch.cat(out) if len(out) > 1 else out[0]), meta

    @torch.no_grad()
    def classify_latents(self, latents: torch.Tensor, task: str, bridge_id: str = ""):
        """Same contract as ReceiverEngine.classify_latents: float latents [B, K, d_wire] → probs [B, L], meta."""
        return self._classify(latents.float(), None, task, bridge_id, wire=None)

    @torch.no_grad()
    def classify_quantized(self, values: torch.Tensor, scales: torch.Tensor | None, task: str, bridge_id: str = "",
                           wire_dtype: str | None = None):
        """Wire values [B, K, d_wire] (+ int8 scales [B, K]), host or device → probs [B, L]; dequantized in the graph."""
        wire = wire_dtype or {torch.int8: "int8", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[values.dtype]
        if (wire == "int8") != (scales is not None):
            raise ValueError("int8 values need per-token scales (and only int8 values take them)")
        return self._classify(values, scales, task, bridge_id, wire=wire)

    def classify_wire(self, items: list[WireTensor], task: str, bridge_id: str = ""):
        """Validated WireTensors (codec.decode checks every field) → probs [B, L]."""
        meta = self.engine.bridges.resolve(task, bridge_id).meta
        latents = decode_batch(items, (meta.config.num_latents, meta.config.d_wire))
        return self.classify_latents(latents, task, meta.bridge_id)

    # text path (relay baseline, zero-shot)
    def _build_text(self, task: str, batch: int, length: int):
        label_ids = self.engine.label_ids(task)
        label_w = self._label_weight(label_ids)
        inputs = {
            "ids": torch.full((batch, length), self.pad_id, dtype=torch.long, device=self.device),  # [Bb, Tb]
            "lengths": torch.ones(batch, dtype=torch.long, device=self.device),  # [Bb]
        }

        def forward(ids: torch.Tensor, lengths: torch.Tensor):
            return self._scores(self.lm.embed(ids), lengths - 1, label_ids, label_w)  # [Bb, L]

        return forward, inputs

    @torch.no_grad()
    def classify_text(self, texts: list[str], task: str, relayed: bool = True) -> torch.Tensor:
        """Same contract as ReceiverEngine.classify_text: relay texts (or raw inputs) → probs [B, L]."""
        spec = get_task(task)
        prompts = [spec.relay_prompt_for_receiver(t) if relayed else spec.text_prompt(t) for t in texts]
        cap = self.engine.max_text_tokens
        enc = self.lm.tokenizer(prompts, padding="longest", truncation=True, max_length=cap, return_tensors="pt",
                                padding_side="right")
        ids, lengths = enc["input_ids"], enc["attention_mask"].sum(dim=1)
        T = ids.shape[1]
        Tb = length_bucket(T, cap) if self.config.length_buckets else T
        out = []
        with self._lock:
            for start in range(0, len(prompts), self.config.max_batch):
                chunk_ids, chunk_len = ids[start:start + self.config.max_batch], lengths[start:start + self.config.max_batch]
                n = chunk_ids.shape[0]
                Bb = _pick_bucket(n, self.config.batch_buckets)
                runner = self._runners.get(("text", task, Bb, Tb), lambda: self._build_text(task, Bb, Tb))
                if n < Bb or T < Tb:
                    runner.inputs["ids"].fill_(self.pad_id)
                    runner.inputs["lengths"].fill_(1)
                runner.inputs["ids"][:n, :T].copy_(_stage(chunk_ids, self.device), non_blocking=True)
                runner.inputs["lengths"][:n].copy_(_stage(chunk_len, self.device), non_blocking=True)
                out.append(runner.run()[:n].clone())
        return torch.cat(out) if len(out) > 1 else out[0]

    def warmup(self, task: str, batch_sizes: tuple[int, ...] = (1,), wire: str | None = "config", bridge_id: str = "") -> None:
        wire = self.config.wire_dtype if wire == "config" else wire
        meta = self.engine.bridges.resolve(task, bridge_id).meta
        K, D = meta.config.num_latents, meta.config.d_wire
        for b in batch_sizes:
            if wire == "int8":
                self.classify_quantized(torch.zeros(b, K, D, dtype=torch.int8), torch.ones(b, K), task, meta.bridge_id)
            elif wire is None:
                self.classify_latents(torch.zeros(b, K, D), task, meta.bridge_id)
            else:
                self.classify_quantized(torch.zeros(b, K, D, dtype=_DTYPES[wire]), None, task, meta.bridge_id)


# ---- both sides in one process ------------------------------------------------------------------------------
class FastPipeline:
    """Sender + receiver fast paths in one process (one or two GPUs): texts → label probabilities."""

    def __init__(self, sender: SenderFastPath, receiver: ReceiverFastPath):
        self.sender, self.receiver = sender, receiver

    def classify_ids(self, ids: torch.Tensor, lengths: torch.Tensor, task: str, bridge_id: str = "",
                     wire: str | None = None) -> torch.Tensor:
        """Tokenized inputs → probs [B, L] on the receiver's device, without a host sync; `wire` (default: the
        config's) is the codec the soft tokens go through between the two sides."""
        wire = wire or self.sender.config.wire_dtype
        values, scales, meta = self.sender.encode_ids(ids, lengths, task, bridge_id, wire=wire)
        probs, _ = self.receiver.classify_quantized(values, scales, task, meta.bridge_id, wire_dtype=wire)
        return probs

    @torch.no_grad()
    def classify_batch(self, texts: list[str], task: str, bridge_id: str = "") -> torch.Tensor:
        """texts → label probabilities [B, L] float32 on the CPU (the one host sync of the call)."""
        ids, lengths = self.sender.tokenize(texts)
        return self.classify_ids(ids, lengths, task, bridge_id).cpu()

    @torch.no_grad()
    def classify_async(self, texts: list[str], task: str, bridge_id: str = "", wire: str | None = None) -> "PendingProbs":
        """classify_batch without waiting: returns once the batch is queued on the device, so a batcher can
        tokenise and queue the next batch while this one runs. `.result()` → probs [B, L] on the CPU."""
        ids, lengths = self.sender.tokenize(texts)
        return to_host_async(self.classify_ids(ids, lengths, task, bridge_id, wire))  # [B, L]: a fresh tensor


class PendingProbs:
    """A device tensor on its way to the host: `result()` is complete once its copy (and only its) has finished."""

    def __init__(self, host: torch.Tensor, done: "torch.cuda.Event | None"):
        self._host, self._done = host, done

    def result(self) -> torch.Tensor:
        if self._done is not None:
            self._done.synchronize()  # this batch only, not the batches queued after it
        return self._host


def to_host_async(t: torch.Tensor) -> PendingProbs:
    """Queue a device→host copy of `t` (which must not be a graph buffer that a later replay overwrites) into pinned
    memory behind the work that produces it, with an event: no stream-wide sync, so more work can be queued."""
    if t.device.type != "cuda":
        return PendingProbs(t.cpu(), None)
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(t.device))
    return PendingProbs(host, done)


# ---- text relay baseline ------------------------------------------------------------------------------------
class RelayGenerator:
    """Greedy decoding with a static KV cache: prefill and every decode step are one CUDA graph each.

    The relay baseline with the same optimisations as the bridge path (static shapes, graphs, no host sync
    between tokens: the argmax is fed back on the device). It always runs `max_new_tokens` steps and cuts the
    text at the first EOS afterwards. One prompt at a time; models with sliding-window layers are not supported.
    """

    def __init__(self, lm: LanguageModel, config: FastPathConfig | None = None, max_prompt_tokens: int = 256,
                 max_new_tokens: int = 64):
        from transformers import StaticCache

        self.lm, self.config = lm, config or FastPathConfig()
        _check_dtype(lm, self.config)
        mconf = lm.model.config
        if getattr(mconf, "sliding_window", None) and set(getattr(mconf, "layer_types", None) or ["sliding"]) != {"full_attention"}:
            raise NotImplementedError(f"RelayGenerator: {lm.spec} has sliding-window layers; use LanguageModel.generate")
        self.device = lm.device
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
        self.max_len = max_prompt_tokens + max_new_tokens
        self.cache = StaticCache(config=mconf, max_cache_len=self.max_len)
        # transformers ≥ 5.2x calls the cache argument `cache` (older 5.x: `past_key_values`).
        self._cache_kw = "cache" if "cache" in inspect.signature(lm.model.forward).parameters else "past_key_values"
        self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)  # last generated token, fed back
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)  # its position
        self.step = torch.zeros(1, dtype=torch.long, device=self.device)  # index into `out`
        self.out = torch.zeros(1, max_new_tokens, dtype=torch.long, device=self.device)  # generated ids
        self._runners = _RunnerCache(self.device, self.config)
        self._lock = threading.Lock()

    def prompt_ids(self, message: str) -> torch.Tensor:
        """Same prompt as LanguageModel.generate: chat template when the tokenizer has one. → [1, T] (CPU)."""
        tok = self.lm.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True)
            return tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return tok(message, return_tensors="pt")["input_ids"]

    def _step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mask = attention_masks(self.lm.model.config, positions, self.max_len)  # [1, 1, Q, max_len]
        out = self.lm.model(input_ids=ids, position_ids=positions[None], attention_mask=mask, use_cache=True,
                            logits_to_keep=1, **{self._cache_kw: self.cache})
        return out.logits[:, -1].argmax(dim=-1)  # [1]

    def _build_prefill(self, length: int):
        inputs = {"ids": torch.zeros(1, length, dtype=torch.long, device=self.device)}  # [1, T]

        def prefill(ids: torch.Tensor):
            self.cache.reset()  # zeroes the KV tensors and the write position in place (graph-safe)
            nxt = self._step(ids, torch.arange(length, device=ids.device))
            self.token.copy_(nxt.view(1, 1))
            self.out[:, 0].copy_(nxt)
            self.pos.fill_(length)
            self.step.fill_(1)
            return self.token

        return prefill, inputs

    def _build_decode(self):
        def decode():
            nxt = self._step(self.token, self.pos)
            self.token.copy_(nxt.view(1, 1))
            self.out.index_copy_(1, self.step, nxt.view(1, 1))
            self.step.add_(1)
            self.pos.add_(1)
            return self.token

        return decode, {}

    @torch.no_grad()
    def generate_ids(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """prompt ids [1, T] → the next `max_new_tokens` greedy ids [N] on the device (no host sync)."""
        T = prompt.shape[1]
        if T > self.max_prompt_tokens or not 1 <= max_new_tokens <= self.max_new_tokens:
            raise ValueError(f"prompt of {T} tokens / {max_new_tokens} new tokens exceed {self.max_prompt_tokens}/{self.max_new_tokens}")
        with self._lock:
            prefill = self._runners.get(("prefill", T), lambda: self._build_prefill(T))
            decode = self._runners.get(("decode",), self._build_decode)
            prefill.inputs["ids"].copy_(_stage(prompt, self.device), non_blocking=True)
            prefill.run()
            for _ in range(max_new_tokens - 1):
                decode.run()
            return self.out[0, :max_new_tokens].clone()

    def generate(self, messages: list[str], max_new_tokens: int) -> list[str]:
        """Same contract as LanguageModel.generate (greedy, stripped text, cut at EOS)."""
        eos = self.lm.tokenizer.eos_token_id
        texts = []
        for m in messages:
            ids = self.generate_ids(self.prompt_ids(m), max_new_tokens).tolist()
            if eos is not None and eos in ids:
                ids = ids[: ids.index(eos)]
            texts.append(self.lm.tokenizer.decode(ids, skip_special_tokens=True).strip())
        return texts


def eager_generate_ids(lm: LanguageModel, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """HF generate, greedy, dynamic KV cache, exactly `max_new_tokens` (EOS ignored): the eager relay baseline."""
    prompt = prompt.to(lm.device)
    out = lm.model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id,
        temperature=None, top_p=None, top_k=None,
    )
    return out[0, prompt.shape[1]:]


__all__ = [
    "FastPathConfig", "SenderFastPath", "ReceiverFastPath", "FastPipeline", "RelayGenerator", "StaticRunner",
    "attention_masks", "dequantize", "wire_tensors", "eager_generate_ids", "FusedDecoder", "fused_decoder",
    "decoder_block", "supports_fused", "compile_error",
]
