"""The receiver side: ReceiverFastPath, ReceiverEngine's `classify_latents` / `classify_text` with static shapes
and CUDA graphs (wire values → adapter → soft tokens in the prompt → all layers → label-only logits → probs)."""

from __future__ import annotations

import torch

from telepathy.bridge.codec import WireTensor, decode_batch
from telepathy.bridge.lm import length_bucket
from telepathy.bridge.runtime.engine import ReceiverEngine
from telepathy.bridge.runtime.fastpath.config import _DTYPES, FastPathConfig, _pick_bucket
from telepathy.bridge.runtime.fastpath.graphs import _stage
from telepathy.bridge.runtime.fastpath.layers import attention_masks, fused_decoder
from telepathy.bridge.runtime.fastpath.side import _FastSide
from telepathy.bridge.runtime.fastpath.wire import adapter_fn


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
                runner = self._runners.get(("latents", meta.bridge_id, Bb, wire), lambda: self._build_latents(meta.bridge_id, Bb, wire))  # noqa: B023 - get() calls it at once
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
        spec = self.engine.bridges.tasks[task]
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
                runner = self._runners.get(("text", task, Bb, Tb), lambda: self._build_text(task, Bb, Tb))  # noqa: B023 - get() calls it at once
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
