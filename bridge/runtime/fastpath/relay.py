"""The text-relay baseline: RelayGenerator (greedy decoding with a static KV cache, prefill and each decode step
one CUDA graph) and `eager_generate_ids`, the HF-generate reference it is measured against."""

from __future__ import annotations

import inspect
import threading

import torch

from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.runtime.fastpath.config import FastPathConfig, _check_dtype
from telepathy.bridge.runtime.fastpath.graphs import _RunnerCache, _stage
from telepathy.bridge.runtime.fastpath.layers import attention_masks


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
