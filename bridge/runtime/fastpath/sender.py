"""The sender side: SenderFastPath, SenderEngine's `encode` with static shapes and CUDA graphs (texts → ids →
decoder layers 1..L → bridge encoder → wire values, quantized inside the graph)."""

from __future__ import annotations

import torch

from telepathy.bridge.lm import length_bucket
from telepathy.bridge.runtime.fastpath.config import _pick_bucket
from telepathy.bridge.runtime.fastpath.graphs import _stage
from telepathy.bridge.runtime.fastpath.layers import attention_masks, fused_decoder
from telepathy.bridge.runtime.fastpath.side import _FastSide
from telepathy.bridge.runtime.fastpath.wire import encoder_fn, wire_tensors


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
                runner = self._runners.get((meta.bridge_id, Bb, Tb, wire), lambda: self._build(meta.bridge_id, Bb, Tb, wire))  # noqa: B023 - get() calls it at once
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
