"""The baselines the bridge is compared with. All of them score labels exactly like the bridge does: the logits
of the verbalizers' first tokens at the last position (LanguageModel.label_logits), argmax.

- zero-shot: TaskSpec.text_prompt (instruction listing the options + the input) on the sender or the receiver;
- few-shot: TaskSpec.few_shot_prompt with k demonstrations *per class* from the training split, fixed per seed;
- text relay: the sender writes a short task-aware text (TaskSpec.relay_message, greedy, ≤ 48 tokens), the
  receiver classifies that text alone (TaskSpec.relay_prompt_for_receiver);
- prompt tuning: K trainable vectors inserted after the receiver's BOS, before TaskSpec.text_prompt(text) — the
  receiver *does* read the text; trained with the bridge's own budget (steps, lr, batch, schedule) by the same
  joint trainer (bridge.train), model selection on the same validation split;
- linear probe: multinomial logistic regression (L2 tuned on the validation split) on the sender's mean-pooled
  hidden states at the bridge's layer.

Inputs are cut to the same number of tokens the bridge's sender reads (max_text_tokens) before any prompt is
built, so no method sees more of the input than another, and a long input never pushes the answer prefix out.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.tasks import TaskSpec
from telepathy.bridge.training.config import TrainConfig
from telepathy.bridge.training.data import Example
from telepathy.bridge.training.loop import Split, TrainRun


def truncate_texts(lm: LanguageModel, texts: list[str], max_tokens: int) -> list[str]:
    """Cut each text to its first `max_tokens` tokens of `lm` (texts already short enough stay as they are)."""
    out = []
    all_ids = lm.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []  # one batched call
    for t, ids in zip(texts, all_ids):
        out.append(t if len(ids) <= max_tokens else lm.tokenizer.decode(ids[:max_tokens]))
    return out


def _by_length(lm: LanguageModel, texts: list[str]) -> list[int]:
    """Indices longest-first (by characters, a good proxy): batches of similar lengths pad little."""
    return sorted(range(len(texts)), key=lambda i: -len(texts[i]))


@torch.no_grad()
def score_prompts(lm: LanguageModel, prompts: list[str], label_ids: torch.Tensor, batch_size: int = 64,
                  max_length: int = 2048, desc: str = "", progress: bool = False) -> torch.Tensor:
    """Plain prompts → label log-probabilities [N, L] (float32, CPU), batched by length, in input order."""
    out = torch.zeros(len(prompts), len(label_ids))
    order = _by_length(lm, prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        rows = order[start:start + batch_size]
        logits = lm.classify_prompts([prompts[i] for i in rows], label_ids, max_length=max_length)
        out[rows] = logits.log_softmax(-1).float().cpu()
    return out


def accuracy(log_probs: torch.Tensor, rows: list[Example]) -> float:
    labels = torch.tensor([r.label for r in rows])
    return float((log_probs.argmax(-1) == labels).float().mean()) if rows else float("nan")


# --------------------------------------------------------------------------------------------- zero/few-shot


def zero_shot(lm: LanguageModel, spec: TaskSpec, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    return score_prompts(lm, [spec.text_prompt(t) for t in texts], lm.label_token_ids(spec.verbalizers), batch_size)


def pick_shots(train: list[Example], spec: TaskSpec, k: int, seed: int, max_words: int = 40) -> list[tuple[str, int]]:
    """k demonstrations per class from `train`, short ones only (prompts stay sane), in a seeded random order."""
    rng = random.Random(seed)
    shots: list[tuple[str, int]] = []
    for label in range(spec.num_labels):
        pool = [r for r in train if r.label == label and len(r.text.split()) <= max_words]
        pool = pool or [r for r in train if r.label == label]
        shots += [(r.text, r.label) for r in rng.sample(pool, min(k, len(pool)))]
    rng.shuffle(shots)
    return shots


def few_shot(lm: LanguageModel, spec: TaskSpec, texts: list[str], shots: list[tuple[str, int]],
             batch_size: int = 32) -> torch.Tensor:
    prompts = [spec.few_shot_prompt(shots, t) for t in texts]
    return score_prompts(lm, prompts, lm.label_token_ids(spec.verbalizers), batch_size)


# --------------------------------------------------------------------------------------------- text relay


@torch.no_grad()
def relay_texts(sender: LanguageModel, spec: TaskSpec, texts: list[str], max_new_tokens: int = 48,
                batch_size: int = 128, progress: bool = False) -> list[str]:
    """The sender's greedy task-aware relay text for every input (what the text path sends over the wire)."""
    out: list[str] = [""] * len(texts)
    order = _by_length(sender, texts)
    for start in tqdm(range(0, len(order), batch_size), desc="relay", disable=not progress, leave=False):
        rows = order[start:start + batch_size]
        generated = sender.generate([spec.relay_message(texts[i]) for i in rows], max_new_tokens=max_new_tokens)
        for i, g in zip(rows, generated):
            out[i] = g
    return out


def classify_relayed(receiver: LanguageModel, spec: TaskSpec, relayed: list[str], batch_size: int = 64) -> torch.Tensor:
    prompts = [spec.relay_prompt_for_receiver(t) for t in relayed]
    return score_prompts(receiver, prompts, receiver.label_token_ids(spec.verbalizers), batch_size)


# --------------------------------------------------------------------------------------------- prompt tuning


@dataclass
class PromptIds:
    """Receiver token ids of many prompts, packed: ids [total], offsets [N], lengths [N] (like SenderStates)."""

    ids: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor
    pad_id: int

    @classmethod
    def build(cls, lm: LanguageModel, prompts: list[str], device) -> PromptIds:
        rows = lm.tokenizer(list(prompts), add_special_tokens=True)["input_ids"] if prompts else []
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        flat = torch.tensor([t for r in rows for t in r], dtype=torch.long)
        offsets = torch.cumsum(lengths, 0) - lengths
        return cls(flat.to(device), offsets.to(device), lengths.to(device), int(lm.tokenizer.pad_token_id))

    def __post_init__(self) -> None:
        self._host_lengths: list[int] = self.lengths.tolist()

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def batch(self, rows, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows (a host list) → right-padded ids [B, T] and mask [B, T]; `idx`: the same rows on the device."""
        rows = rows.tolist() if torch.is_tensor(rows) else list(rows)
        T = max(self._host_lengths[i] for i in rows)
        if idx is None:
            idx = torch.tensor(rows, dtype=torch.long, device=self.ids.device)
        lengths = self.lengths[idx]
        steps = torch.arange(T, device=idx.device)
        mask = steps[None, :] < lengths[:, None]  # [B, T]
        pos = torch.where(mask, self.offsets[idx][:, None] + steps[None, :], self.offsets[idx][:, None])
        ids = torch.where(mask, self.ids[pos], torch.full_like(pos, self.pad_id))
        return ids, mask.long()


class SoftPrompt(nn.Module):
    """K trainable vectors, each divided by its RMS and multiplied by a learnable scale that starts at the median
    RMS of the receiver's input embeddings — the same output normalisation as the bridge adapter, so one
    learning rate means the same thing for both. Initialised from the embeddings of K random vocabulary tokens.
    """

    def __init__(self, init: torch.Tensor, target_rms: float):
        super().__init__()
        init = init.float()
        self.prompt = nn.Parameter(init / init.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt() * 0.02)  # [K, H]
        self.scale = nn.Parameter(torch.tensor(float(target_rms)))

    def forward(self) -> torch.Tensor:
        x = self.prompt
        return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * self.scale  # [K, H]


class PromptTuningRun(TrainRun):
    """[BOS] + [K soft prompt] + text_prompt(text) tokens → receiver; only the soft prompt trains."""

    kind = "prompt_tuning"

    def __init__(self, name: str, config: TrainConfig, receiver: LanguageModel, train: Split, validation: Split,
                 out_dir: Path | None = None):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            token_ids = torch.randint(0, min(10_000, int(receiver.config.vocab_size)), (config.soft_tokens,))
        with torch.no_grad():
            init = receiver.embed(token_ids.to(receiver.device)).float()
        module = SoftPrompt(init, receiver.embedding_rms_median()).to(receiver.device)
        super().__init__(name, config, module, receiver, train, validation, out_dir)
        bos = receiver.tokenizer.bos_token_id
        first = receiver.tokenizer("x", add_special_tokens=True)["input_ids"][0]
        self.keep_first = bos is not None and first == bos  # insert after the BOS the tokenizer adds

    def inputs(self, source: PromptIds, rows, idx=None, wire_dtype=None):
        ids, mask = source.batch(rows, idx)  # [B, T]
        tokens = self.receiver.embed(ids)  # [B, T, H]
        B = ids.shape[0]
        soft = self.module().to(tokens.dtype).unsqueeze(0).expand(B, -1, -1)  # [B, K, H]
        ones = mask.new_ones(B, soft.shape[1])
        n = 1 if self.keep_first else 0
        embeds = torch.cat([tokens[:, :n], soft, tokens[:, n:]], dim=1)  # [B, n + K + T - n, H]
        mask = torch.cat([mask[:, :n], ones, mask[:, n:]], dim=1)
        return embeds, mask, None

    def pad_group(self) -> str:
        return f"prompt:{self.config.spec.name}"  # text prompts: one receiver forward per task (lengths differ a lot)


def prompt_split(receiver: LanguageModel, spec: TaskSpec, rows: list[Example], max_text_tokens: int) -> Split:
    texts = truncate_texts(receiver, [r.text for r in rows], max_text_tokens)
    source = PromptIds.build(receiver, [spec.text_prompt(t) for t in texts], receiver.device)
    return Split(source, torch.tensor([r.label for r in rows], dtype=torch.long, device=receiver.device))


# --------------------------------------------------------------------------------------------- linear probe


@dataclass
class ProbeResult:
    l2: float
    validation_accuracy: float
    predictions: list[torch.Tensor]  # argmax labels for each evaluated set


def _fit_logreg(x: torch.Tensor, y: torch.Tensor, num_labels: int, l2: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    W = torch.zeros(x.shape[1], num_labels, device=x.device, requires_grad=True)
    b = torch.zeros(num_labels, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W + b, y) + 0.5 * l2 * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 eval_xs: list[torch.Tensor], num_labels: int, l2_grid=(1e-4, 1e-3, 1e-2, 1e-1, 1.0),
                 max_iter: int = 300) -> ProbeResult:
    """Logistic regression on standardised features; L2 chosen by validation accuracy (ties → stronger L2)."""
    # LBFGS makes many small steps with host-side checks: on the CPU it is faster than on a GPU for these sizes.
    train_x, train_y, val_x, val_y = train_x.cpu().float(), train_y.cpu(), val_x.cpu().float(), val_y.cpu()
    eval_xs = [x.cpu().float() for x in eval_xs]
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    norm = lambda x: (x.float() - mean) / std  # noqa: E731
    xt, xv = norm(train_x), norm(val_x)
    best = None
    for l2 in sorted(l2_grid, reverse=True):
        W, b = _fit_logreg(xt, train_y, num_labels, l2, max_iter)
        acc = float(((xv @ W + b).argmax(-1) == val_y).float().mean())
        if best is None or acc > best[0]:
            best = (acc, l2, W, b)
    acc, l2, W, b = best
    return ProbeResult(l2, acc, [(norm(x) @ W + b).argmax(-1).cpu() for x in eval_xs])
