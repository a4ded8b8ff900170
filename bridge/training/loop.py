"""The joint training loop: several trainable runs, one frozen receiver.

Several runs (seeds, tasks, wire shapes, or the prompt-tuning baseline) can train *jointly*: each run has its own
module, optimizer, schedule, sampler and gradient clipping, and only the frozen receiver's forward/backward is
shared — rows of all runs are concatenated (right-padded to a common length, which a causal LM with a padding
mask does not see). Gradients of a sum of per-run losses are the per-run gradients, so a jointly trained run is
the same optimisation as a run trained alone (up to float rounding of different batch shapes), at a fraction
of the wall time on a launch-bound GPU.

TrainRun is the generic part (optimizer, schedule, model selection, resumable checkpoints, diagnostics);
subclasses say how rows become receiver inputs: train.BridgeRun (bridges), baselines.PromptTuningRun.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from telepathy.bridge.checkpoint import CheckpointError, write_safetensors
from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.training.config import TrainConfig
from telepathy.bridge.training.data import BalancedSampler

log = logging.getLogger(__name__)


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
        write_safetensors(tensors, folder / "trainer_state.safetensors")
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
    for r in runs:
        c = r.config
        if c.steps < c.warmup_steps and r.step < c.steps:
            last = lr_at(c.steps - 1, c.steps, c.lr, c.warmup_steps, c.min_lr_ratio)
            log.warning("%s: steps (%d) < warmup_steps (%d): the learning rate never reaches its peak %g (the last "
                        "step uses %g); use fewer warm-up steps (--warmup) or more steps (--steps)",
                        r.name, c.steps, c.warmup_steps, c.lr, last)
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


__all__ = ["TrainRun", "Split", "train_jointly", "lr_at", "batch_similarity", "pad_cat", "autocast_for"]
