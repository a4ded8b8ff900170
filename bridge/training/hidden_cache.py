"""Sender hidden states at the bridge layer, computed once per (sender, layer, texts) and reused.

The sender is frozen, so its states for a data set never change: training computes them once (on the GPU they
stay on the device) and pads per batch. States are packed without padding:

    states  [total_tokens, H]  bf16 (fp32 for an fp32 sender), the real tokens of every row, row after row
    offsets [N]                 where each row starts in `states`
    lengths [N]                 how many tokens each row has

`batch(idx)` gathers rows back into a right-padded [B, T, H] block + mask [B, T], T = the longest row of that
batch. Real-token states do not depend on how much right padding the sender saw (causal attention), so these
are the states `SenderEngine.encode` computes at serving time.

On disk a cache entry is one safetensors file (nothing is unpickled), named by a key over the sender's
fingerprint, the layer, the token limit, the dtype and the texts themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from telepathy.bridge.checkpoint import unique_tmp, write_safetensors
from telepathy.bridge.lm import LanguageModel

CACHE_FORMAT = "telepathy-hidden-states-v1"


@dataclass
class SenderStates:
    states: torch.Tensor  # [total_tokens, H] packed real-token states
    offsets: torch.Tensor  # [N] long, start of each row in `states`
    lengths: torch.Tensor  # [N] long, tokens per row (≥ 1)
    layer: int  # decoder layer the states come from (1-based)
    sender_digest: str  # ModelFingerprint.digest of the sender that made them

    def __post_init__(self) -> None:
        if self.states.dim() != 2:
            raise ValueError(f"states must be [total_tokens, H], got shape {tuple(self.states.shape)}")
        if self.offsets.shape != self.lengths.shape or self.offsets.dim() != 1:
            raise ValueError("offsets and lengths must be 1-D tensors of the same length")
        self._host_lengths: list[int] = self.lengths.tolist()  # batch() pads without a device→host sync

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.states.shape[1])

    @property
    def device(self) -> torch.device:
        return self.states.device

    def to(self, device: str | torch.device) -> SenderStates:
        return SenderStates(self.states.to(device), self.offsets.to(device), self.lengths.to(device), self.layer,
                            self.sender_digest)

    def batch(self, rows, idx: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows → right-padded states [B, T, H] and mask [B, T] (1 = real token), T = longest of the batch.

        `rows` is a host list (or CPU tensor), so T is found without a GPU sync; `idx` is the same rows on the
        states' device when the caller has them there already (else they are copied).
        """
        rows = rows.tolist() if torch.is_tensor(rows) else list(rows)
        T = max(self._host_lengths[i] for i in rows)
        if idx is None:
            idx = torch.tensor(rows, dtype=torch.long, device=self.offsets.device)
        lengths = self.lengths[idx]  # [B]
        steps = torch.arange(T, device=idx.device)  # [T]
        mask = steps[None, :] < lengths[:, None]  # [B, T] bool
        positions = self.offsets[idx][:, None] + steps[None, :]  # [B, T]
        positions = torch.where(mask, positions, self.offsets[idx][:, None])  # padded slots read the row's first token
        states = self.states[positions]  # [B, T, H]
        states = states * mask.unsqueeze(-1).to(states.dtype)  # zero the padding (the bridge masks it anyway)
        return (states if dtype is None else states.to(dtype)), mask.long()

    def mean_pooled(self, batch_size: int = 4096) -> torch.Tensor:
        """Mean over each row's real tokens, float32 [N, H] (the linear probe's features)."""
        out = []
        for start in range(0, len(self), batch_size):
            states, mask = self.batch(range(start, min(start + batch_size, len(self))), dtype=torch.float32)
            out.append(states.sum(dim=1) / mask.sum(dim=1, keepdim=True))
        return torch.cat(out) if out else torch.zeros(0, self.hidden_size)

    # ---- disk ------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """One safetensors file, written atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"states": self.states.contiguous().cpu(), "offsets": self.offsets.cpu(), "lengths": self.lengths.cpu()}
        tmp = unique_tmp(path)
        try:
            write_safetensors(tensors, tmp, metadata={"format": CACHE_FORMAT, "layer": str(self.layer),
                                                      "sender_digest": self.sender_digest})
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> SenderStates:
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                if meta.get("format") != CACHE_FORMAT:
                    raise ValueError(f"{path}: not a hidden-state cache file (format {meta.get('format')!r})")
                return cls(f.get_tensor("states"), f.get_tensor("offsets"), f.get_tensor("lengths"),
                           int(meta["layer"]), meta["sender_digest"])
        except (SafetensorError, KeyError) as exc:
            raise ValueError(f"{path}: unreadable hidden-state cache ({exc})") from exc


def storage_dtype(lm: LanguageModel) -> torch.dtype:
    """The sender's own 16-bit dtype (bf16 on the GPU), else fp32.

    Not fp16: SmolLM2's layer-24 states hold massive activations (|x| ≈ 3·10⁴ on the first token), at the edge
    of fp16's range.
    """
    return lm.dtype if lm.dtype in (torch.bfloat16, torch.float16) else torch.float32


@torch.no_grad()
def compute_sender_states(
    lm: LanguageModel,
    texts: list[str],
    layer: int,
    batch_size: int = 64,
    max_length: int = 256,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> SenderStates:
    """Run the sender up to `layer` over `texts` (longest first, so batches pad little) and pack the states."""
    dtype = dtype or storage_dtype(lm)
    device = torch.device(device) if device is not None else lm.device
    lengths = [min(len(ids), max_length) for ids in lm.tokenizer(list(texts))["input_ids"]] if texts else []
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    pieces: list[torch.Tensor | None] = [None] * len(texts)
    for start in tqdm(range(0, len(texts), batch_size), desc=f"sender states L{layer}", disable=not progress,
                      leave=False):
        rows = order[start:start + batch_size]
        ids, mask = lm.tokenize([texts[i] for i in rows], max_length=max_length)
        states = lm.hidden_states(ids, mask, layer)  # [B, T, H]
        n_real = mask.sum(dim=1).tolist()
        for j, i in enumerate(rows):
            pieces[i] = states[j, : max(int(n_real[j]), 1)].to(device=device, dtype=dtype)
    row_lengths = torch.tensor([p.shape[0] for p in pieces], dtype=torch.long, device=device)
    offsets = torch.cumsum(row_lengths, dim=0) - row_lengths
    packed = torch.cat(pieces) if pieces else torch.zeros(0, lm.hidden_size, dtype=dtype, device=device)
    return SenderStates(packed, offsets, row_lengths, layer, lm.fingerprint().digest)


def cache_key(lm: LanguageModel, texts: list[str], layer: int, max_length: int, dtype: torch.dtype) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_FORMAT, lm.fingerprint().digest, layer, max_length, str(dtype)]).encode())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:24]


def sender_states(
    lm: LanguageModel,
    texts: list[str],
    layer: int,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    max_length: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> SenderStates:
    """`compute_sender_states`, read from / written to `cache_dir` when one is given."""
    dtype = storage_dtype(lm)
    path = Path(cache_dir) / f"{cache_key(lm, texts, layer, max_length, dtype)}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        try:
            cached = SenderStates.load(path, device=device or lm.device)
            if len(cached) == len(texts) and cached.layer == layer and cached.sender_digest == lm.fingerprint().digest:
                return cached
        except ValueError:
            pass  # a damaged entry: recompute and overwrite it
    states = compute_sender_states(lm, texts, layer, batch_size, max_length, dtype, device, progress)
    if path is not None:
        states.save(path)
    return states


class StatesStore:
    """Sender states by content key: in memory for this process, and on disk when `cache_dir` is set.

    Training and evaluation in one process (the GPU pipeline) share one store, so every data set is run through
    the sender once.
    """

    def __init__(self, cache_dir: str | Path | None = None, batch_size: int = 64, progress: bool = False):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size = batch_size
        self.progress = progress
        self._memory: dict[str, SenderStates] = {}

    def get(self, lm: LanguageModel, texts: list[str], layer: int, max_length: int = 256) -> SenderStates:
        key = cache_key(lm, texts, layer, max_length, storage_dtype(lm))
        if key not in self._memory:
            self._memory[key] = sender_states(lm, texts, layer, self.cache_dir, self.batch_size, max_length,
                                              progress=self.progress)
        return self._memory[key]

    def clear(self) -> None:
        self._memory.clear()
