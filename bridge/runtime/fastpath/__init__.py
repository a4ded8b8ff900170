"""Fast path: static shapes, fused layers and CUDA graphs for both sides of the bridge.

The eager engines (bridge/runtime/engine.py) are the reference; this package computes the same function with the
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

Modules, lowest first (each imports only the ones above it):

    config     FastPathConfig (the switches; CLI flags, TELEPATHY_FASTPATH_* settings), batch buckets, dtype check
    graphs     StaticRunner (a function over fixed buffers, captured as a CUDA graph), the runner cache, staging
    layers     4-D causal masks for HF layers; the fused Llama/Mistral decoder layer and stack (+ torch.compile)
    wire       device-side dequantize, WireTensors; compiled bridge encoder/adapter; the compile caches
    side       _FastSide: what both sides hold (engine, config, runners, lock)
    sender     SenderFastPath: texts → quantized wire values
    receiver   ReceiverFastPath: wire values (or relay texts) → label probabilities
    pipeline   FastPipeline: both sides in one process; PendingProbs, the asynchronous copy to the host
    relay      RelayGenerator: the text-relay baseline with a static KV cache and graphs; eager_generate_ids
"""

from telepathy.bridge.runtime.fastpath.config import FastPathConfig
from telepathy.bridge.runtime.fastpath.graphs import StaticRunner
from telepathy.bridge.runtime.fastpath.layers import (
    FusedDecoder,
    attention_masks,
    decoder_block,
    fused_decoder,
    supports_fused,
)
from telepathy.bridge.runtime.fastpath.pipeline import FastPipeline, PendingProbs, to_host_async
from telepathy.bridge.runtime.fastpath.receiver import ReceiverFastPath
from telepathy.bridge.runtime.fastpath.relay import RelayGenerator, eager_generate_ids
from telepathy.bridge.runtime.fastpath.sender import SenderFastPath
from telepathy.bridge.runtime.fastpath.wire import (
    adapter_fn,
    compile_error,
    dequantize,
    encoder_fn,
    release_caches,
    wire_tensors,
)

__all__ = [
    "FastPathConfig", "SenderFastPath", "ReceiverFastPath", "FastPipeline", "RelayGenerator", "StaticRunner",
    "attention_masks", "dequantize", "wire_tensors", "eager_generate_ids", "FusedDecoder", "fused_decoder",
    "decoder_block", "supports_fused", "compile_error", "release_caches", "encoder_fn", "adapter_fn",
    "PendingProbs", "to_host_async",
]
