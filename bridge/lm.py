"""LanguageModel: the one wrapper both sides use around a causal LM.

It gives what the bridge needs and nothing more: tokenization with bucketed lengths, hidden states at a chosen
layer (running only the layers below it), input embeddings and their RMS statistics, label scoring that
computes logits for the label tokens at the last position only, and greedy generation for the text relay.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from telepathy.bridge.models import LoadedModel, load_model


@dataclass(frozen=True)
class ModelFingerprint:
    """Identity of a model as far as a bridge is concerned (weights may be re-quantized, shapes may not)."""

    spec: str
    architecture: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    vocab_hash: str  # sha256 of the tokenizer's token → id map

    @property
    def digest(self) -> str:
        # `spec` is left out: the same model loaded from a GGUF file or its converted folder is the same model.
        key = f"{self.architecture}|{self.hidden_size}|{self.num_layers}|{self.vocab_size}|{self.vocab_hash}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {**asdict(self), "digest": self.digest}

    @classmethod
    def from_dict(cls, d: dict) -> ModelFingerprint:
        return cls(**{k: d[k] for k in ("spec", "architecture", "hidden_size", "num_layers", "vocab_size", "vocab_hash")})

    def describe(self) -> str:
        return f"{self.spec} ({self.architecture}, hidden {self.hidden_size}, {self.num_layers} layers, digest {self.digest})"


def length_bucket(n: int, max_length: int, minimum: int = 16) -> int:
    """Pad lengths to powers of two so the number of distinct shapes (graphs, kernels) stays small."""
    bucket = minimum
    while bucket < n:
        bucket *= 2
    return min(bucket, max_length)


class LanguageModel:
    def __init__(self, loaded: LoadedModel, device: str | torch.device):
        self.spec = loaded.spec
        self.source = loaded.source
        self.model = loaded.model.eval().requires_grad_(False)
        self.tokenizer = loaded.tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.device = torch.device(device)
        self.config = self.model.config.get_text_config()
        self.backbone = self.model.get_decoder()
        self._truncated: dict[int, nn.Module] = {}
        self._fingerprint: ModelFingerprint | None = None

    @classmethod
    def load(cls, spec: str, device: str = "cpu", dtype: torch.dtype | None = None) -> LanguageModel:
        return cls(load_model(spec, device=device, dtype=dtype), device)

    # ---- identity -------------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def fingerprint(self) -> ModelFingerprint:
        if self._fingerprint is None:
            vocab = sorted(self.tokenizer.get_vocab().items())
            vocab_hash = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
            self._fingerprint = ModelFingerprint(
                spec=self.spec,
                architecture=type(self.model).__name__,
                hidden_size=self.hidden_size,
                num_layers=self.num_layers,
                vocab_size=int(self.config.vocab_size),
                vocab_hash=vocab_hash,
            )
        return self._fingerprint

    # ---- tokens ---------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str], max_length: int = 256, bucket: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and mask on the model's device: ids [B, T], mask [B, T] (1 = real token)."""
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if bucket:
            target = length_bucket(ids.shape[1], max_length)
            if target > ids.shape[1]:
                pad = target - ids.shape[1]
                ids = torch.nn.functional.pad(ids, (0, pad), value=self.tokenizer.pad_token_id)
                mask = torch.nn.functional.pad(mask, (0, pad), value=0)
        return ids.to(self.device), mask.to(self.device)

    def token_count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def truncate(self, text: str, max_tokens: int) -> str:
        """The longest prefix of `text` that is at most `max_tokens` tokens, cut at a token boundary of the
        original string (no decode round trip, which would re-space or normalize the text)."""
        if not getattr(self.tokenizer, "is_fast", False):  # offsets need a fast tokenizer: decode instead
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return text if len(ids) <= max_tokens else self.tokenizer.decode(ids[:max_tokens])
        enc = self.tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_tokens,
                             return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if len(offsets) < max_tokens:
            return text  # shorter than the bound: nothing was cut
        return text[:offsets[-1][1]]

    def label_token_ids(self, verbalizers: tuple[str, ...] | list[str]) -> torch.Tensor:
        """First token of each verbalizer, [L]; they must be distinct or the labels cannot be told apart."""
        firsts = [self.tokenizer(v, add_special_tokens=False)["input_ids"][0] for v in verbalizers]
        if len(set(firsts)) != len(firsts):
            pieces = [self.tokenizer.convert_ids_to_tokens(t) for t in firsts]
            raise ValueError(f"verbalizers {list(verbalizers)} share first tokens {pieces} for {self.spec}")
        return torch.tensor(firsts, dtype=torch.long, device=self.device)

    # ---- embeddings -----------------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] → embeddings [B, T, H], with the model's own embedding scale (Gemma multiplies by √H)."""
        return self.model.get_input_embeddings()(ids)

    def embed_text(self, text: str, add_special_tokens: bool = True) -> torch.Tensor:
        """One text → embeddings [T, H] (used for fixed primers and answer prefixes)."""
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens, return_tensors="pt")["input_ids"]
        return self.embed(ids.to(self.device))[0]

    @torch.no_grad()
    def embedding_rms_median(self) -> float:
        """Median per-row RMS of the (scaled) input-embedding matrix: the soft tokens' target norm."""
        emb = self.model.get_input_embeddings()
        weight = emb.weight.float()
        scale = float(getattr(emb, "scalar_embed_scale", 1.0))
        rms = weight.pow(2).mean(dim=-1).sqrt() * scale  # [V]
        return float(rms.median())

    # ---- forward paths --------------------------------------------------------------------------------------
    def _backbone_to(self, layer: int) -> nn.Module:
        """A view of the decoder stack that stops after `layer` (1-based) and skips the final norm.

        Shares every parameter with the full model; the layers above `layer` are never run.
        """
        if not 1 <= layer <= self.num_layers:
            raise ValueError(f"layer must be in 1..{self.num_layers}, got {layer}")
        if layer not in self._truncated:
            view = copy.copy(self.backbone)
            view._modules = dict(self.backbone._modules)
            view._modules["layers"] = nn.ModuleList(list(self.backbone.layers[:layer]))
            view._modules["norm"] = nn.Identity()
            self._truncated[layer] = view
        return self._truncated[layer]

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor, layer: int) -> torch.Tensor:
        """ids, mask [B, T] → output of decoder layer `layer` (before the final norm), [B, T, H]."""
        out = self._backbone_to(layer)(input_ids=ids, attention_mask=mask, use_cache=False)
        return out.last_hidden_state

    def label_logits(self, inputs_embeds: torch.Tensor, mask: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the label tokens at each row's last real position: embeds [B, T, H] → [B, L] float32.

        Only L rows of the output matrix are multiplied, never the full vocabulary at every position.
        """
        hidden = self.backbone(inputs_embeds=inputs_embeds, attention_mask=mask, use_cache=False).last_hidden_state
        last = (mask.sum(dim=1) - 1).clamp(min=0)  # [B]; mask is right-padded
        h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, H]
        weight = self.model.get_output_embeddings().weight[label_ids]  # [L, H]
        logits = h_last.float() @ weight.float().T  # [B, L]
        softcap = getattr(self.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    @torch.no_grad()
    def classify_prompts(self, prompts: list[str], label_ids: torch.Tensor, max_length: int = 512) -> torch.Tensor:
        """Plain text prompts → label logits [B, L] (zero-/few-shot baselines and the text path)."""
        ids, mask = self.tokenize(prompts, max_length=max_length)
        return self.label_logits(self.embed(ids), mask, label_ids)

    @torch.no_grad()
    def generate(self, messages: list[str], max_new_tokens: int, stop: threading.Event | None = None) -> list[str]:
        """Greedy continuation of each user message (chat template when the tokenizer has one).

        `stop`: generation ends at the next token once it is set (the callers went away); what was generated
        so far is returned."""
        if getattr(self.tokenizer, "chat_template", None):
            prompts = [
                self.tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True)
                for m in messages
            ]
            add_special = False  # the template already holds the special tokens
        else:
            prompts, add_special = messages, True
        self.tokenizer.padding_side = "left"  # generation appends on the right
        try:
            enc = self.tokenizer(prompts, padding="longest", return_tensors="pt", add_special_tokens=add_special).to(self.device)
        finally:
            self.tokenizer.padding_side = "right"
        criteria = StoppingCriteriaList([_StopWhenSet(stop)]) if stop is not None else None
        out = self.model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
            temperature=None, top_p=None, top_k=None, stopping_criteria=criteria,
        )
        new = out[:, enc["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


class _StopWhenSet(StoppingCriteria):
    """Ends every row of a generation once `event` is set (checked once per generated token)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
