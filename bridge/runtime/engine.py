"""Sender and receiver engines: the model work behind each service, with no networking.

SenderEngine: texts → sender hidden states at the bridge layer → BridgeEncoder → wire latents (or relay text).
ReceiverEngine: wire latents → BridgeAdapter → [primer | K soft tokens | answer prefix] → label probabilities;
or relay text → text prompt → label probabilities.
The gRPC servicers convert protobuf ↔ tensors and call these; so do `telepathy classify`, eval and benches.
Task specs come from the BridgeSet's TaskCatalog: the built-ins, the tasks the loaded bridges carry, and any given.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from telepathy.bridge.checkpoint import BridgeMeta, CheckpointError, find_bridges, load_adapter, load_encoder
from telepathy.bridge.codec import WireTensor, encode_batch
from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.resampler import BridgeAdapter, BridgeEncoder
from telepathy.bridge.tasks import TaskCatalog, TaskSpec
from telepathy.contract import SHIPPED_BRIDGES  # noqa: F401 - re-exported

log = logging.getLogger(__name__)


class BridgeNotFoundError(KeyError):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class LoadedBridge:
    meta: BridgeMeta
    module: torch.nn.Module  # BridgeEncoder on the sender, BridgeAdapter on the receiver


class BridgeSet:
    """Bridges loaded on one side, by id and by task (the first one found per task is the task's default), and the
    catalog of the tasks this side knows: the built-ins, the bridges' own tasks, then `tasks` (spec, origin)."""

    def __init__(self, bridges: list[LoadedBridge], tasks: Iterable[tuple[TaskSpec, str]] = ()):
        self.by_id: dict[str, LoadedBridge] = {}
        self.by_task: dict[str, LoadedBridge] = {}
        for b in bridges:
            self.by_id[b.meta.bridge_id] = b
            self.by_task.setdefault(b.meta.task, b)
        # TaskConflictError when a bridge's task differs from a built-in (or another bridge's) of the same name
        self.tasks = TaskCatalog([*((b.meta.spec, f"the bridge {b.meta.path}") for b in bridges), *tasks])

    def resolve(self, task: str, bridge_id: str = "") -> LoadedBridge:
        if bridge_id:
            found = self.by_id.get(bridge_id)
            if found is None:
                raise BridgeNotFoundError(f"no bridge with id {bridge_id!r} is loaded; loaded: {sorted(self.by_id)}")
            if task and found.meta.task != task:
                raise BridgeNotFoundError(f"bridge {bridge_id!r} is for task {found.meta.task!r}, not {task!r}")
            return found
        self.tasks[task]  # unknown task names raise UnknownTaskError
        found = self.by_task.get(task)
        if found is None:
            raise BridgeNotFoundError(f"no bridge is loaded for task {task!r}; loaded tasks: {sorted(self.by_task)}")
        return found

    def __len__(self) -> int:
        return len(self.by_id)

    def metas(self) -> list[BridgeMeta]:
        return [b.meta for b in self.by_id.values()]


def load_bridge_set(root: str | Path | None, lm: LanguageModel, role: str, device: str | torch.device,
                    tasks: Iterable[tuple[TaskSpec, str]] = ()) -> BridgeSet:
    """Load every bridge under `root` that fits `lm`; skip (and log) the ones trained for another model. `tasks`:
    more (spec, origin) for the catalog, after the bridges' own (e.g. a service's task files)."""
    loaded: list[LoadedBridge] = []
    live = lm.fingerprint()
    for path in find_bridges(root) if root else []:
        try:
            if role == "sender":
                module, meta = load_encoder(path, sender=live, device=str(device))
            else:
                module, meta = load_adapter(path, receiver=live, device=str(device))
        except CheckpointError as exc:
            log.warning("skipping bridge %s: %s", path, exc)
            continue
        loaded.append(LoadedBridge(meta, module.to(lm.dtype)))
    return BridgeSet(loaded, tasks)


class SenderEngine:
    def __init__(self, lm: LanguageModel, bridges: BridgeSet, max_text_tokens: int = 256):
        self.lm = lm
        self.bridges = bridges
        self.max_text_tokens = max_text_tokens

    @torch.no_grad()
    def encode(self, texts: list[str], task: str, bridge_id: str = "") -> tuple[torch.Tensor, BridgeMeta]:
        """texts → wire latents [B, K, d_wire] on the model device, and the bridge that made them."""
        bridge = self.bridges.resolve(task, bridge_id)
        encoder: BridgeEncoder = bridge.module
        ids, mask = self.lm.tokenize(texts, max_length=self.max_text_tokens)
        states = self.lm.hidden_states(ids, mask, bridge.meta.config.sender_layer)  # [B, T, Hs]
        return encoder(states, mask), bridge.meta

    def encode_wire(self, texts: list[str], task: str, wire_dtype: str, bridge_id: str = "") -> tuple[list[WireTensor], BridgeMeta]:
        latents, meta = self.encode(texts, task, bridge_id)
        return encode_batch(latents, wire_dtype), meta

    def relay(self, texts: list[str], task: str, max_tokens: int, stop: threading.Event | None = None) -> list[str]:
        """Text path: each text → the relay the sender writes about it, at most `max_tokens` new tokens.

        The sender reads at most max_text_tokens tokens of each text, as the bridge path does (tokenize
        truncates there): a 4,000-character input costs a bounded prompt, not an unbounded one. `stop` ends
        generation early when nobody waits for it any more."""
        spec = self.bridges.tasks[task]
        messages = [spec.relay_message(self.lm.truncate(t, self.max_text_tokens)) for t in texts]
        return self.lm.generate(messages, max_new_tokens=max_tokens, stop=stop)


@dataclass
class _ReceiverInputs:
    prefix: torch.Tensor  # [P, H] BOS + primer embeddings
    suffix: torch.Tensor  # [S, H] answer prefix embeddings (may be empty)
    label_ids: torch.Tensor  # [L]


class ReceiverEngine:
    def __init__(self, lm: LanguageModel, bridges: BridgeSet, max_text_tokens: int = 512, max_input_tokens: int = 256):
        self.lm = lm
        self.bridges = bridges
        self.max_text_tokens = max_text_tokens  # the whole prompt
        self.max_input_tokens = max_input_tokens  # the text inside it (relay or raw input), as on the sender
        self._inputs: dict[str, _ReceiverInputs] = {}
        self._label_ids: dict[str, torch.Tensor] = {}

    def label_ids(self, task: str) -> torch.Tensor:
        if task not in self._label_ids:
            self._label_ids[task] = self.lm.label_token_ids(self.bridges.tasks[task].verbalizers)
        return self._label_ids[task]

    def _inputs_for(self, meta: BridgeMeta) -> _ReceiverInputs:
        key = meta.bridge_id
        if key not in self._inputs:
            with torch.no_grad():
                prefix = self.lm.embed_text(meta.primer, add_special_tokens=True)
                suffix = self.lm.embed_text(meta.training.get("answer_prefix", ""), add_special_tokens=False) \
                    if meta.training.get("answer_prefix") else prefix[:0]
            self._inputs[key] = _ReceiverInputs(prefix, suffix, self.lm.label_token_ids(tuple(meta.verbalizers)))
        return self._inputs[key]

    def soft_inputs(self, meta: BridgeMeta, soft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """soft tokens [B, K, H] → receiver inputs_embeds [B, P+K+S, H] and an all-ones mask."""
        parts = self._inputs_for(meta)
        B = soft.shape[0]
        embeds = torch.cat(
            [parts.prefix.expand(B, -1, -1), soft.to(parts.prefix.dtype), parts.suffix.expand(B, -1, -1)], dim=1
        )
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)

    @torch.no_grad()
    def classify_latents(self, latents: torch.Tensor, task: str, bridge_id: str = "") -> tuple[torch.Tensor, BridgeMeta]:
        """wire latents [B, K, d_wire] → label probabilities [B, L] (float32)."""
        bridge = self.bridges.resolve(task, bridge_id)
        adapter: BridgeAdapter = bridge.module
        soft = adapter(latents.to(self.lm.device))  # [B, K, Hr]
        embeds, mask = self.soft_inputs(bridge.meta, soft)
        logits = self.lm.label_logits(embeds, mask, self._inputs_for(bridge.meta).label_ids)
        return logits.softmax(dim=-1), bridge.meta

    @torch.no_grad()
    def classify_text(self, texts: list[str], task: str, relayed: bool = True) -> torch.Tensor:
        """Text path: relay texts (or raw inputs when relayed=False) → label probabilities [B, L]."""
        spec = self.bridges.tasks[task]
        # Cut the text, not the prompt: truncating the prompt would drop the answer cue at its end.
        texts = [self.lm.truncate(t, self.max_input_tokens) for t in texts]
        prompts = [spec.relay_prompt_for_receiver(t) if relayed else spec.text_prompt(t) for t in texts]
        return self.lm.classify_prompts(prompts, self.label_ids(task), max_length=self.max_text_tokens).softmax(dim=-1)
