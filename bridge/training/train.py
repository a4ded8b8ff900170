"""Bridge training: the sender and the receiver stay frozen, only the bridge learns.

One step, for one bridge (shapes for the default pair, K = 8 soft tokens):

    cached sender states [B, T, 576] ──Bridge──▶ soft tokens [B, K, 640]
    ReceiverEngine.soft_inputs: [BOS + primer | K soft tokens] ──receiver──▶ label logits [B, L]
    loss = CE(label logits, label) (+ 0.1 × batch diversity for > 2 classes); AdamW, warmup + cosine, clip 1.0

The receiver input is built by `ReceiverEngine.soft_inputs`, the very function the receiver service calls,
so training and serving cannot drift apart. The sender's states at the bridge layer are computed once per data
set (bridge.hidden_cache) and padded per batch.

Several runs (seeds, tasks, wire shapes, or the prompt-tuning baseline) can train *jointly*: each run has its own
module, optimizer, schedule, sampler and gradient clipping, and only the frozen receiver's forward/backward is
shared — rows of all runs are concatenated (right-padded to a common length, which a causal LM with a padding
mask does not see). Gradients of a sum of per-run losses are the per-run gradients, so a jointly trained run is
the same optimisation as a run trained alone (up to float rounding of different batch shapes), at a fraction
of the wall time on a launch-bound GPU.

Model selection uses a validation split carved from train (bridge.data.train_validation_split): every
`eval_every` steps and at the end, the weights with the best validation accuracy are kept. Test data is never
looked at here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from telepathy.bridge.checkpoint import BridgeMeta, CheckpointError, save_bridge
from telepathy.bridge.training.data import BalancedSampler, Example, train_validation_split
from telepathy.bridge.runtime.engine import BridgeSet, ReceiverEngine
from telepathy.bridge.training.hidden_cache import SenderStates, StatesStore
from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.models import DEFAULT_RECEIVER, DEFAULT_SENDER
from telepathy.bridge.resampler import Bridge, BridgeConfig, parameter_count
from telepathy.bridge.tasks import TASKS, TaskSpec, UnknownTaskError, get_task

log = logging.getLogger(__name__)

# Chosen by the wire ablation (docs/RESULTS.md, results/wire_ablation.json): the fewest bytes per request whose
# validation accuracy stays within 1 point of bf16 / full width / K=16 — int8, K=8 × d_wire=64 = 544 bytes.
DEFAULT_SOFT_TOKENS = 8
DEFAULT_D_WIRE = 64
DEFAULT_WIRE_DTYPE = "int8"
# Data split seed: the validation rows carved from train are the same for every training seed.
SPLIT_SEED = 0


def default_sender_layer(num_layers: int) -> int:
    """A late layer, before the final norm: 24 of SmolLM2's 30 (the research found late layers carry the task)."""
    return max(1, min(num_layers, round(0.8 * num_layers)))


@dataclass
class TrainConfig:
    task: str  # ag_news | trec | sst2
    sender: str = DEFAULT_SENDER  # model spec (bridge.models)
    receiver: str = DEFAULT_RECEIVER
    soft_tokens: int = DEFAULT_SOFT_TOKENS  # K soft tokens per request
    d_model: int = 512  # resampler width
    depth: int = 1  # perceiver blocks; 1 keeps the shipped bridge ≤ 10 MB (4.8M params in bf16)
    num_heads: int = 8
    d_wire: int = DEFAULT_D_WIRE  # values per soft token on the wire (≤ d_model)
    sender_layer: int | None = None  # None → default_sender_layer(sender layers): 24 of 30 for SmolLM2
    steps: int = 800
    batch_size: int = 32  # class-balanced
    lr: float = 2e-4  # AdamW peak learning rate
    weight_decay: float = 0.01  # on matrices only (not norms, biases, the RMS scale)
    warmup_steps: int = 50  # linear warmup, then cosine to min_lr_ratio × lr
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm, per run
    diversity_weight: float | None = None  # None → 0.1 for > 2 classes, 0 for 2 (where it caused collapse)
    eval_every: int = 100  # validation accuracy (model selection) every this many steps, and at the end
    checkpoint_every: int = 200  # resumable checkpoint every this many steps, and at the end
    validation_size: int = 500  # rows carved from train for model selection
    train_limit: int | None = None  # use only the first rows of the remaining train split (tests)
    max_text_tokens: int = 256  # sender input truncation (SenderEngine's limit)
    seed: int = 0  # bridge init + batch order
    device: str = "cpu"

    def __post_init__(self) -> None:
        get_task(self.task)  # UnknownTaskError with the known names
        for name in ("soft_tokens", "d_model", "depth", "num_heads", "d_wire", "steps", "batch_size", "eval_every",
                     "checkpoint_every", "validation_size", "max_text_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.sender_layer is not None and self.sender_layer < 1:
            raise ValueError(f"TrainConfig.sender_layer must be ≥ 1, got {self.sender_layer}")
        if self.train_limit is not None and self.train_limit < 1:
            raise ValueError(f"TrainConfig.train_limit must be ≥ 1, got {self.train_limit}")
        if not self.lr > 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError("TrainConfig: lr and grad_clip must be > 0 and weight_decay ≥ 0")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("TrainConfig: warmup_steps must be ≥ 0 and min_lr_ratio in [0, 1]")
        if self.d_wire > self.d_model:
            raise ValueError(f"TrainConfig.d_wire ({self.d_wire}) cannot exceed d_model ({self.d_model})")
        if self.batch_size < get_task(self.task).num_labels:
            raise ValueError(f"TrainConfig.batch_size must be ≥ the {get_task(self.task).num_labels} labels of {self.task}")

    @property
    def spec(self) -> TaskSpec:
        return get_task(self.task)

    @property
    def diversity(self) -> float:
        if self.diversity_weight is not None:
            return self.diversity_weight
        return 0.1 if self.spec.num_labels > 2 else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Learning rate of update `step` (0-based): linear warmup, then cosine from lr down to min_ratio × lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def batch_similarity(soft: torch.Tensor) -> torch.Tensor:
    """Mean off-diagonal cosine similarity between the examples of a batch, soft [B, K, H] → scalar.

    1 means every input produced the same soft tokens (collapse); the diversity term adds weight × this.
    """
    B = soft.shape[0]
    if B < 2:
        return soft.new_zeros((), dtype=torch.float32)
    z = F.normalize(soft.flatten(1).float(), dim=-1)  # [B, K·H]
    sim = z @ z.T  # [B, B]
    return (sim.sum() - sim.diagonal().sum()) / (B * (B - 1))


def pad_cat(embeds: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad [B_i, T_i, H] blocks to the longest T and stack them: [ΣB_i, T, H], mask [ΣB_i, T]."""
    T = max(e.shape[1] for e in embeds)
    out_e = [F.pad(e, (0, 0, 0, T - e.shape[1])) for e in embeds]
    out_m = [F.pad(m, (0, T - m.shape[1])) for m in masks]
    return torch.cat(out_e), torch.cat(out_m)


def autocast_for(device: torch.device):
    """bf16 autocast for the trainable module on CUDA; plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------- runs


@dataclass
class Split:
    """What a run reads for one split: its own encoding of the rows (sender states, prompt ids) + labels."""

    source: object  # SenderStates for a bridge, PromptIds for prompt tuning
    labels: torch.Tensor  # [N] long, on the training device


class TrainRun:
    """One trainable module in a joint loop. Subclasses say how rows become receiver inputs."""

    kind = "run"

    def __init__(self, name: str, config: TrainConfig, module: nn.Module, receiver: LanguageModel,
                 train: Split, validation: Split, out_dir: Path | None):
        self.name = name
        self.config = config
        self.spec = config.spec
        self.module = module
        self.receiver = receiver
        self.train = train
        self.validation = validation
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.label_ids = receiver.label_token_ids(self.spec.verbalizers)  # [L]
        # The whole batch order up front: a pure function of (labels, batch size, seed), so a resumed run replays it
        # from its step, and the loop indexes a device tensor instead of copying indices to the GPU every step.
        sampler = BalancedSampler(train.labels.tolist(), config.batch_size, seed=config.seed)
        self.schedule: list[list[int]] = [sampler.next_batch() for _ in range(config.steps)]  # [steps][B] host
        self.schedule_device = torch.tensor(self.schedule, dtype=torch.long, device=receiver.device)  # [steps, B]
        decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=(0.9, 0.999), fused=receiver.device.type == "cuda",
        )
        self.step = 0  # updates taken
        self.best_accuracy = -1.0
        self.best_step = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict] = []  # validation rows

    # ---- what subclasses define ------------------------------------------------------------------------------
    def inputs(self, source, rows, idx: torch.Tensor | None = None,
               wire_dtype: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Rows of `source` → receiver inputs_embeds [B, T, H], mask [B, T], soft tokens [B, K, H] (None where the
        soft tokens do not depend on the input). `rows` is a host list (it sets the padded length without a GPU
        sync); `idx` the same rows already on the device, if at hand."""
        raise NotImplementedError

    def pad_group(self) -> str:
        """Runs with the same group share one receiver forward (similar lengths pad little)."""
        return "all"

    # ---- prediction -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, source, n: int, batch_size: int = 256, wire_dtype: str | None = None) -> torch.Tensor:
        """Label log-probabilities for rows 0..n-1 of `source`: [n, L] float32 on the CPU."""
        was_training = self.module.training
        self.module.eval()
        out = []
        device = self.receiver.device
        for start in range(0, n, batch_size):
            with autocast_for(device):
                embeds, mask, _ = self.inputs(source, range(start, min(n, start + batch_size)), wire_dtype=wire_dtype)
            out.append(self.receiver.label_logits(embeds, mask, self.label_ids).log_softmax(-1).cpu())
        self.module.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, len(self.label_ids))

    def accuracy(self, split: Split, wire_dtype: str | None = None, batch_size: int = 256) -> float:
        pred = self.predict(split.source, len(split.labels), batch_size, wire_dtype).argmax(-1)
        return float((pred == split.labels.cpu()).float().mean())

    # ---- model selection ---------------------------------------------------------------------------------------
    def validate(self) -> float:
        acc = self.accuracy(self.validation)
        self.history.append({"step": self.step, "val_accuracy": acc})
        if acc >= self.best_accuracy:  # ties go to the later (better trained) weights
            self.best_accuracy, self.best_step = acc, self.step
            self.best_state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        return acc

    def load_best(self) -> None:
        if self.best_state is not None:
            self.module.load_state_dict(self.best_state)

    # ---- resumable state -------------------------------------------------------------------------------------
    def trainer_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"module.{k}": v.detach().float().contiguous().cpu() for k, v in self.module.state_dict().items()}
        if self.best_state is not None:
            tensors.update({f"best.{k}": v.float().contiguous().cpu() for k, v in self.best_state.items()})
        opt = self.optimizer.state_dict()
        for pid, st in opt["state"].items():
            for key, value in st.items():
                tensors[f"optim.{pid}.{key}"] = torch.as_tensor(value).float().reshape(-1).contiguous().cpu() \
                    if key == "step" else value.contiguous().cpu()
        info = {
            "step": self.step, "best_accuracy": self.best_accuracy, "best_step": self.best_step,
            "history": self.history, "config": self.config.to_dict(), "kind": self.kind,
            "optim_param_groups": opt["param_groups"],
        }
        return tensors, info

    def load_trainer_state(self, tensors: dict[str, torch.Tensor], info: dict) -> None:
        saved = TrainConfig.from_dict(info["config"])
        if saved != self.config:
            diff = {k: (v, getattr(self.config, k)) for k, v in saved.to_dict().items() if getattr(self.config, k) != v}
            raise CheckpointError(f"cannot resume {self.name}: the checkpoint was made with other settings "
                                  f"(checkpoint vs now: {diff})")
        device = self.receiver.device
        self.module.load_state_dict({k.removeprefix("module."): v for k, v in tensors.items() if k.startswith("module.")})
        best = {k.removeprefix("best."): v.to(device) for k, v in tensors.items() if k.startswith("best.")}
        self.best_state = best or None
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, key = k.split(".", 2)
                state.setdefault(int(pid), {})[key] = v.reshape(()) if key == "step" else v
        self.optimizer.load_state_dict({"state": state, "param_groups": info["optim_param_groups"]})
        self.step = int(info["step"])
        self.best_accuracy = float(info["best_accuracy"])
        self.best_step = int(info["best_step"])
        self.history = list(info["history"])

    def save_checkpoint(self) -> Path | None:
        """checkpoints/step_NNNNNN/: trainer_state.{safetensors,json} (+ the bridge's own format for bridges).

        trainer_state.json is written last, so its presence marks a complete checkpoint; older ones are removed.
        """
        if self.out_dir is None:
            return None
        root = self.out_dir / "checkpoints"
        folder = root / f"step_{self.step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        self.save_weights(folder)
        tensors, info = self.trainer_state()
        save_file(tensors, str(folder / "trainer_state.safetensors"))
        tmp = folder / "trainer_state.json.tmp"
        tmp.write_text(json.dumps(info) + "\n", encoding="utf-8")
        os.replace(tmp, folder / "trainer_state.json")
        for old in root.glob("step_*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
        return folder

    def save_weights(self, folder: Path) -> None:
        """Periodic checkpoints of bridges are also loadable bridges; other runs have only trainer_state."""

    def resume(self) -> bool:
        """Load the latest complete checkpoint under out_dir/checkpoints; False when there is none."""
        if self.out_dir is None:
            return False
        done = sorted((self.out_dir / "checkpoints").glob("step_*/trainer_state.json"))
        if not done:
            return False
        folder = done[-1].parent
        info = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        self.load_trainer_state(load_file(str(folder / "trainer_state.safetensors"), device=str(self.receiver.device)), info)
        self._truncate_diagnostics()
        log.info("%s: resumed at step %d from %s", self.name, self.step, folder)
        return True

    # ---- diagnostics ---------------------------------------------------------------------------------------------
    @property
    def diagnostics_path(self) -> Path | None:
        return self.out_dir / "diagnostics.jsonl" if self.out_dir is not None else None

    def _truncate_diagnostics(self) -> None:
        path = self.diagnostics_path
        if path is None or not path.exists():
            return
        keep = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= self.step]
        path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

    def write_diagnostics(self, rows: list[dict]) -> None:
        path = self.diagnostics_path
        if path is None or not rows:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


class BridgeRun(TrainRun):
    """A bridge: cached sender states → Bridge → ReceiverEngine.soft_inputs (the serving layout)."""

    kind = "bridge"

    def __init__(self, name: str, config: TrainConfig, sender: LanguageModel, receiver: LanguageModel,
                 train: Split, validation: Split, out_dir: Path | None):
        layer = config.sender_layer or default_sender_layer(sender.num_layers)
        if layer > sender.num_layers:
            raise ValueError(f"sender_layer {layer} exceeds the sender's {sender.num_layers} layers")
        self.bridge_config = BridgeConfig(
            sender_hidden=sender.hidden_size, receiver_hidden=receiver.hidden_size, sender_layer=layer,
            num_latents=config.soft_tokens, d_model=config.d_model, depth=config.depth, num_heads=config.num_heads,
            d_wire=config.d_wire,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            module = Bridge(self.bridge_config, target_rms=receiver.embedding_rms_median())
        super().__init__(name, config, module.to(receiver.device).train(), receiver, train, validation, out_dir)
        self.sender_fp = sender.fingerprint()
        self.receiver_fp = receiver.fingerprint()
        self.engine = ReceiverEngine(receiver, BridgeSet([]))
        # The same primer / answer prefix / verbalizers the saved checkpoint will carry → the same layout.
        self.layout = BridgeMeta(
            path=Path(out_dir or "."), config=self.bridge_config, task=config.task, labels=list(self.spec.labels),
            verbalizers=list(self.spec.verbalizers), primer=self.spec.primer, sender=self.sender_fp,
            receiver=self.receiver_fp, weights_sha256=f"in-training:{name}",
        )

    def inputs(self, source: SenderStates, rows, idx=None, wire_dtype=None):
        states, mask = source.batch(rows, idx)  # [B, T, Hs], [B, T]
        return bridge_inputs(self.module, self.engine, self.layout, states, mask, wire_dtype)

    def pad_group(self) -> str:
        return "bridges"  # short inputs (primer + K): all bridges pad together cheaply

    def save_weights(self, folder: Path) -> None:
        save_bridge(folder, self.module, self.config.task, self.sender_fp, self.receiver_fp,
                    training={"steps_done": self.step, "in_progress": True})

    def save_final(self, out_dir: Path, extra: dict | None = None, dtype: torch.dtype = torch.bfloat16) -> BridgeMeta:
        """The selected (best-validation) weights as a bridge checkpoint, bf16 by default (half the bytes)."""
        self.load_best()
        training = training_metadata(self.config, self)
        training.update(extra or {})
        return save_bridge(out_dir, self.module, self.config.task, self.sender_fp, self.receiver_fp,
                           training=training, dtype=dtype)


def bridge_inputs(bridge: Bridge, engine: ReceiverEngine, meta: BridgeMeta, states: torch.Tensor, mask: torch.Tensor,
                  wire_dtype: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sender states [B, T, Hs] → (receiver inputs_embeds [B, P+K, Hr], mask, soft tokens [B, K, Hr]).

    encoder → (optionally the wire's quantize/dequantize) → adapter → ReceiverEngine.soft_inputs: the serving path.
    """
    wire = bridge.encoder(states, mask)  # [B, K, d_wire]
    if wire_dtype is not None:
        wire = wire_round_trip(wire, wire_dtype)
    soft = bridge.adapter(wire)  # [B, K, Hr]
    embeds, m = engine.soft_inputs(meta, soft)  # [B, P+K, Hr]
    return embeds, m, soft


def wire_round_trip(wire: torch.Tensor, dtype: str) -> torch.Tensor:
    """What the receiver gets after bridge.codec quantizes `wire` [B, K, D] (same arithmetic as codec.decode)."""
    from telepathy.bridge.codec import quantize

    q, scales = quantize(wire, dtype)
    out = q.float() * scales.unsqueeze(-1) if scales is not None else q.float()
    return out.to(wire.dtype)


def training_metadata(config: TrainConfig, run: TrainRun) -> dict:
    import transformers

    return {
        "steps": config.steps, "seed": config.seed, "lr": config.lr, "batch_size": config.batch_size,
        "weight_decay": config.weight_decay, "warmup_steps": config.warmup_steps, "min_lr_ratio": config.min_lr_ratio,
        "grad_clip": config.grad_clip, "diversity_weight": config.diversity, "loss": "answer-token CE (label first tokens)",
        "sampling": "class-balanced", "validation_size": config.validation_size, "split_seed": SPLIT_SEED,
        "validation_accuracy": run.best_accuracy, "best_step": run.best_step, "validation_history": run.history,
        "train_rows": len(run.train.labels), "max_text_tokens": config.max_text_tokens,
        "layout": "[BOS + primer] + [K soft tokens]", "sender": config.sender, "receiver": config.receiver,
        "device": describe_device(run.receiver.device), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "parameters": parameter_count(run.module),
    }


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# --------------------------------------------------------------------------------------------- the joint loop


def train_jointly(runs: list[TrainRun], steps: int, *, progress: bool = True, log_every: int = 10,
                  desc: str = "train") -> float:
    """Train every run for `steps` updates (each from its own current step); returns the wall time in seconds.

    Per step: each run draws a class-balanced batch and builds its receiver inputs; runs of one pad group share
    one receiver forward; one backward for the sum of the losses; then each run clips, schedules and steps alone.
    """
    if not runs:
        return 0.0
    receiver = runs[0].receiver
    if any(r.receiver is not receiver for r in runs):
        raise ValueError("runs trained jointly must share one receiver")
    device = receiver.device
    groups: dict[str, list[TrainRun]] = {}
    for run in runs:
        groups.setdefault(run.pad_group(), []).append(run)
    # One column per distinct label token in a group; each run reads its own columns.
    group_labels: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}
    for g, members in groups.items():
        union: list[int] = []
        for r in members:
            union += [t for t in r.label_ids.tolist() if t not in union]
        cols = [torch.tensor([union.index(t) for t in r.label_ids.tolist()], device=device) for r in members]
        group_labels[g] = (torch.tensor(union, device=device), cols)

    start_step = runs[0].step
    if any(r.step != start_step for r in runs):
        raise ValueError(f"runs trained jointly must be at the same step, got {[r.step for r in runs]}")
    t0 = time.perf_counter()
    pending: list[tuple[int, torch.Tensor, list[float]]] = []  # (step, metrics [R, 6], lrs) not yet on the host
    recent: list[torch.Tensor] = []  # train accuracy [R] of the last 50 steps, for the progress bar
    for run in runs:
        run.module.train()
    bar = tqdm(range(start_step, steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for step in bar:
        losses, rows = [], {}
        for g, members in groups.items():
            union, all_cols = group_labels[g]
            parts = []
            for r in members:
                idx = r.schedule_device[step]  # [B] on the device; the host copy gives the padded length
                with autocast_for(device):
                    embeds, mask, soft = r.inputs(r.train.source, r.schedule[step], idx)
                parts.append((idx, embeds, mask, soft))
            embeds, mask = pad_cat([p[1] for p in parts], [p[2] for p in parts])
            logits = receiver.label_logits(embeds, mask, union)  # [ΣB, U] float32
            row = 0
            for r, cols, (idx, e, _, soft) in zip(members, all_cols, parts):
                lg = logits[row: row + e.shape[0]][:, cols]  # [B, L]
                row += e.shape[0]
                labels = r.train.labels[idx]
                ce = F.cross_entropy(lg, labels)
                sim = batch_similarity(soft) if soft is not None else ce.new_zeros(())
                loss = ce + r.config.diversity * sim if r.config.diversity else ce
                losses.append(loss)
                correct = (lg.argmax(-1) == labels).float().mean()
                soft_rms = soft.float().pow(2).mean().sqrt() if soft is not None else ce.new_zeros(())
                rows[r.name] = [loss.detach(), ce.detach(), sim.detach(), correct, soft_rms.detach()]
        torch.stack(losses).sum().backward()
        metrics, lrs = [], []
        for r in runs:
            grad_norm = torch.nn.utils.clip_grad_norm_(r.module.parameters(), r.config.grad_clip)
            lr = lr_at(r.step, r.config.steps, r.config.lr, r.config.warmup_steps, r.config.min_lr_ratio)
            for group in r.optimizer.param_groups:
                group["lr"] = lr
            r.optimizer.step()
            r.optimizer.zero_grad(set_to_none=True)
            r.step += 1
            metrics.append(torch.stack([*rows[r.name], grad_norm.float()]))
            lrs.append(lr)
        stacked = torch.stack(metrics)  # [R, 6]; no host sync anywhere in the step
        pending.append((step, stacked, lrs))
        recent = (recent + [stacked[:, 3]])[-50:]
        checkpoint_now = any(r.step % r.config.eval_every == 0 or r.step % r.config.checkpoint_every == 0
                             or r.step == r.config.steps for r in runs)
        if len(pending) >= log_every or step + 1 == steps or checkpoint_now:  # diagnostics stay in step order
            _flush(runs, pending)
            bar.set_postfix(loss=f"{pending[-1][1][:, 0].mean().item():.3f}",
                            acc=f"{torch.stack(recent).mean().item():.3f}")
            pending = []
        for r in runs:
            if r.step % r.config.eval_every == 0 or r.step == r.config.steps:
                acc = r.validate()
                r.write_diagnostics([{"step": r.step, "val_accuracy": acc}])
            if r.step % r.config.checkpoint_every == 0 or r.step == r.config.steps:
                r.save_checkpoint()
    bar.close()
    for r in runs:
        r.load_best()
        r.module.eval()
    return time.perf_counter() - t0


_METRIC_NAMES = ("loss", "ce", "diversity", "train_acc", "soft_rms", "grad_norm", "lr")


def _flush(runs: list[TrainRun], pending: list[tuple[int, torch.Tensor, list[float]]]) -> None:
    host = torch.stack([m for _, m, _ in pending]).cpu().tolist()  # [S, R, 6]: one device→host copy per flush
    for i, r in enumerate(runs):
        r.write_diagnostics([{"step": step + 1, **{k: round(v, 6) for k, v in zip(_METRIC_NAMES, [*m[i], lrs[i]])}}
                             for (step, _, lrs), m in zip(pending, host)])


# --------------------------------------------------------------------------------------------- data for bridges


@dataclass
class TaskData:
    train: list[Example]
    validation: list[Example]

    @classmethod
    def load(cls, config: TrainConfig) -> "TaskData":
        train, validation = train_validation_split(config.task, config.validation_size, seed=SPLIT_SEED)
        if config.train_limit is not None:
            train = train[: config.train_limit]
        return cls(train, validation)


def labels_tensor(rows: list[Example], device) -> torch.Tensor:
    return torch.tensor([r.label for r in rows], dtype=torch.long, device=device)


def make_bridge_runs(configs: list[TrainConfig], sender: LanguageModel, receiver: LanguageModel,
                     out_dirs: list[Path | None], store: StatesStore, names: list[str] | None = None) -> list[BridgeRun]:
    """One BridgeRun per config; sender states are computed once per (task, layer, rows) through `store`."""
    runs = []
    for i, (config, out_dir) in enumerate(zip(configs, out_dirs)):
        data = TaskData.load(config)
        layer = config.sender_layer or default_sender_layer(sender.num_layers)
        kw = dict(layer=layer, max_length=config.max_text_tokens)
        train = Split(store.get(sender, [r.text for r in data.train], **kw), labels_tensor(data.train, receiver.device))
        val = Split(store.get(sender, [r.text for r in data.validation], **kw),
                    labels_tensor(data.validation, receiver.device))
        name = names[i] if names else f"{config.task}-seed{config.seed}"
        runs.append(BridgeRun(name, config, sender, receiver, train, val, out_dir))
    return runs


def train_bridges(configs: list[TrainConfig], out_dirs: list[Path], sender: LanguageModel, receiver: LanguageModel,
                  store: StatesStore | None = None, resume: bool = False, progress: bool = True,
                  names: list[str] | None = None, desc: str = "train") -> list[BridgeMeta]:
    """Train the bridges of `configs` jointly and save each (best validation weights) to its out dir."""
    if len({c.steps for c in configs}) > 1:
        raise ValueError("bridges trained jointly must have the same number of steps")
    store = store or StatesStore()
    t0 = time.perf_counter()
    runs = make_bridge_runs(configs, sender, receiver, out_dirs, store, names)
    prep = time.perf_counter() - t0
    for run in runs:
        if resume and not run.resume():
            raise CheckpointError(f"--resume: no checkpoint under {run.out_dir / 'checkpoints'}")
    wall = train_jointly(runs, configs[0].steps, progress=progress, desc=desc)
    metas = []
    for run, out_dir in zip(runs, out_dirs):
        metas.append(run.save_final(out_dir, {"wall_time_s": round(wall + prep, 1), "trained_jointly_with": len(runs)}))
    return metas


# --------------------------------------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a bridge (frozen sender and receiver; only the bridge learns)")
    p.add_argument("--task", required=True, help=f"one of {', '.join(sorted(TASKS))}")
    p.add_argument("--sender", default=DEFAULT_SENDER, help="sender model spec (default %(default)s)")
    p.add_argument("--receiver", default=DEFAULT_RECEIVER, help="receiver model spec (default %(default)s)")
    p.add_argument("--soft-tokens", type=int, default=DEFAULT_SOFT_TOKENS, help="K soft tokens (default %(default)s)")
    p.add_argument("--d-wire", type=int, default=DEFAULT_D_WIRE, help="values per soft token on the wire (default %(default)s)")
    p.add_argument("--d-model", type=int, default=512, help="resampler width (default %(default)s)")
    p.add_argument("--depth", type=int, default=1, help="perceiver blocks (default %(default)s)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default %(default)s)")
    p.add_argument("--sender-layer", type=int, default=None, help="sender layer (default: round(0.8 × layers))")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="class-balanced batch (default %(default)s)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default %(default)s)")
    p.add_argument("--warmup", type=int, default=50, help="warmup steps (default %(default)s)")
    p.add_argument("--diversity", type=float, default=None, help="diversity weight (default 0.1, 0 for 2 classes)")
    p.add_argument("--eval-every", type=int, default=100, help="validate every N steps (default %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=200, help="checkpoint every N steps (default %(default)s)")
    p.add_argument("--validation-size", type=int, default=500, help="rows carved from train (default %(default)s)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training rows")
    p.add_argument("--seed", type=int, default=0, help="init and batch-order seed (default %(default)s)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="model dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--cache-dir", default=None, help="sender hidden-state cache (default: <telepathy cache>/hidden-states)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the hidden-state cache")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="output folder (bridge checkpoint, diagnostics.jsonl, checkpoints/)")
    p.set_defaults(func=_train_command)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # --dtype choices (bf16 is faster on avx512_bf16 CPUs)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_cache_dir() -> Path:
    from telepathy.bridge.embedded import cache_root

    return cache_root() / "hidden-states"


def fail(command: str, message: str) -> int:
    print(f"telepathy {command}: error: {message}", file=sys.stderr)
    return 2


def _train_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        config = TrainConfig(
            task=args.task, sender=args.sender, receiver=args.receiver, soft_tokens=args.soft_tokens,
            d_model=args.d_model, depth=args.depth, num_heads=args.heads, d_wire=args.d_wire, sender_layer=args.sender_layer,
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
            diversity_weight=args.diversity, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
            validation_size=args.validation_size, train_limit=args.train_limit, seed=args.seed,
            device=args.device or default_device(),
        )
    except (UnknownTaskError, ValueError) as exc:
        return fail("train", str(exc))
    if (out / "config.json").exists() and not args.resume:
        return fail("train", f"{out} already holds a trained bridge; pass --resume to continue it or choose another --out")
    if args.resume and not list((out / "checkpoints").glob("step_*/trainer_state.json")):
        return fail("train", f"--resume: no checkpoint under {out / 'checkpoints'}")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        return fail("train", "--device cuda was asked for, but no CUDA device is available")
    from telepathy.bridge.models import ModelSpecError

    try:
        sender = LanguageModel.load(config.sender, device=config.device, dtype=DTYPES.get(args.dtype))
        receiver = LanguageModel.load(config.receiver, device=config.device, dtype=DTYPES.get(args.dtype))
    except (ModelSpecError, FileNotFoundError) as exc:
        return fail("train", str(exc))
    store = StatesStore(None if args.no_cache else (args.cache_dir or default_cache_dir()))
    try:
        (meta,) = train_bridges([config], [out], sender, receiver, store, resume=args.resume,
                                progress=not args.no_progress, desc=f"train {config.task}")
    except CheckpointError as exc:
        return fail("train", str(exc))
    t = meta.training
    print(f"saved bridge {meta.bridge_id} to {out} (validation accuracy {t['validation_accuracy']:.4f} at step "
          f"{t['best_step']}, {t['parameters'] / 1e6:.2f}M parameters, {t['wall_time_s']} s)")
    return 0


__all__ = ["TrainConfig", "BridgeRun", "TrainRun", "Split", "train_jointly", "train_bridges", "make_bridge_runs",
           "lr_at", "batch_similarity", "default_sender_layer", "bridge_inputs", "wire_round_trip"]
