"""Bridge training: the sender and the receiver stay frozen, only the bridge learns.

One step, for one bridge (shapes for the default pair, K = 8 soft tokens):

    cached sender states [B, T, 576] ──Bridge──▶ soft tokens [B, K, 640]
    ReceiverEngine.soft_inputs: [BOS + primer | K soft tokens] ──receiver──▶ label logits [B, L]
    loss = CE(label logits, label) (+ 0.1 × batch diversity for > 2 classes); AdamW, warmup + cosine, clip 1.0

The receiver input is built by `ReceiverEngine.soft_inputs`, the very function the receiver service calls,
so training and serving cannot drift apart. The sender's states at the bridge layer are computed once per data
set (bridge.hidden_cache) and padded per batch.

Several runs (seeds, tasks, wire shapes, or the prompt-tuning baseline) can train *jointly*, sharing only the
frozen receiver's forward/backward (training.loop: TrainRun, train_jointly). TrainConfig, the defaults and the
run-config file are torch-free (training.config); this module adds the bridge runs and `telepathy train`.

Model selection uses a validation split carved from train (bridge.data.train_validation_split): every
`eval_every` steps and at the end, the weights with the best validation accuracy are kept. Test data is never
looked at here.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from telepathy.bridge.checkpoint import BridgeMeta, CheckpointError, save_bridge
from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.resampler import Bridge, BridgeConfig, parameter_count
from telepathy.bridge.runtime.engine import BridgeSet, ReceiverEngine
from telepathy.bridge.tasks import TaskFileError, UnknownTaskError
from telepathy.bridge.training.config import (
    DEFAULT_D_WIRE,
    DEFAULT_SOFT_TOKENS,
    DEFAULT_WIRE_DTYPE,
    MODEL_DTYPES,
    SPLIT_SEED,
    TrainConfig,
    default_sender_layer,
    fail,
    merge_run_options,
    read_run_config,
    run_config_keys,
    write_run_config,
)
from telepathy.bridge.training.data import Example, train_validation_split
from telepathy.bridge.training.hidden_cache import SenderStates, StatesStore
from telepathy.bridge.training.loop import (
    Split,
    TrainRun,
    autocast_for,
    batch_similarity,
    lr_at,
    pad_cat,
    train_jointly,
)
from telepathy.config import SettingsError


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
            path=Path(out_dir or "."), config=self.bridge_config, spec=self.spec, sender=self.sender_fp,
            receiver=self.receiver_fp, weights_sha256=f"in-training:{name}",
        )

    def inputs(self, source: SenderStates, rows, idx=None, wire_dtype=None):
        states, mask = source.batch(rows, idx)  # [B, T, Hs], [B, T]
        return bridge_inputs(self.module, self.engine, self.layout, states, mask, wire_dtype)

    def pad_group(self) -> str:
        return "bridges"  # short inputs (primer + K): all bridges pad together cheaply

    def save_weights(self, folder: Path) -> None:
        save_bridge(folder, self.module, self.spec, self.sender_fp, self.receiver_fp,
                    training={"steps_done": self.step, "in_progress": True})

    def save_final(self, out_dir: Path, extra: dict | None = None, dtype: torch.dtype = torch.bfloat16) -> BridgeMeta:
        """The selected (best-validation) weights as a bridge checkpoint, bf16 by default (half the bytes)."""
        self.load_best()
        training = training_metadata(self.config, self)
        training.update(extra or {})
        return save_bridge(out_dir, self.module, self.spec, self.sender_fp, self.receiver_fp,
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



# --------------------------------------------------------------------------------------------- data for bridges


@dataclass
class TaskData:
    train: list[Example]
    validation: list[Example]

    @classmethod
    def load(cls, config: TrainConfig) -> TaskData:
        train, validation = train_validation_split(config.loaded_task, config.validation_size, seed=SPLIT_SEED)
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
        name = names[i] if names else f"{config.spec.name}-seed{config.seed}"
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



# --------------------------------------------------------------------------------------------- `telepathy train`
# The arguments are defined in telepathy.commands (torch-free, so `telepathy --help` does not import torch).

DTYPES = {name: getattr(torch, name) for name in MODEL_DTYPES}  # --dtype name → torch dtype


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None) -> str:
    """None / "auto" → cuda when available, else cpu; anything else as given."""
    return default_device() if device in (None, "", "auto") else device


def default_cache_dir() -> Path:
    from telepathy.bridge.embedded import cache_root

    return cache_root() / "hidden-states"


def train_command(args: argparse.Namespace) -> int:
    """`telepathy train`: values from --config (if any), the options given on the command line over them."""
    out = Path(args.out)
    try:
        file_values = read_run_config(args.config) if args.config else {}
    except SettingsError as exc:
        return fail("train", str(exc))
    values = merge_run_options(file_values, {k: getattr(args, k, None) for k in run_config_keys()})
    if values.get("task") is None:
        return fail("train", "--task is required (on the command line or in the --config file)")
    dtype = values.pop("dtype", None)
    values["device"] = resolve_device(values.get("device"))
    try:
        config = TrainConfig(**values)
    except (UnknownTaskError, ValueError) as exc:
        return fail("train", str(exc))
    if (out / "config.json").exists() and not args.resume:
        return fail("train", f"{out} already holds a trained bridge; pass --resume to continue it or choose another --out")
    if args.resume and not list((out / "checkpoints").glob("step_*/trainer_state.json")):
        return fail("train", f"--resume: no checkpoint under {out / 'checkpoints'}")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        return fail("train", "--device cuda was asked for, but no CUDA device is available")
    try:
        TaskData.load(config)  # bad data, or too few rows, is said before minutes of model loading
    except TaskFileError as exc:
        return fail("train", str(exc))
    # The models' default dtype (bridge.models.default_dtype), named, so that the run config records it.
    dtype = dtype or ("float32" if config.device.split(":")[0] == "cpu" else "bfloat16")
    from telepathy.bridge.models import ModelSpecError

    try:
        sender = LanguageModel.load(config.sender, device=config.device, dtype=DTYPES[dtype])
        receiver = LanguageModel.load(config.receiver, device=config.device, dtype=DTYPES[dtype])
    except (ModelSpecError, FileNotFoundError) as exc:
        return fail("train", str(exc))
    try:
        config.loaded_task.check_verbalizers(receiver.tokenizer, receiver.spec)
    except TaskFileError as exc:
        return fail("train", str(exc))
    if not args.resume:  # a resumed run keeps the file of its first part until it is done (same TrainConfig)
        print(f"run config: {write_run_config(out, config, dtype, sender.num_layers)}")
    store = StatesStore(None if args.no_cache else (args.cache_dir or default_cache_dir()))
    try:
        (meta,) = train_bridges([config], [out], sender, receiver, store, resume=args.resume,
                                progress=not args.no_progress, desc=f"train {config.spec.name}")
    except (CheckpointError, TaskFileError) as exc:
        return fail("train", str(exc))
    if args.resume:
        print(f"run config: {write_run_config(out, config, dtype, sender.num_layers)}")
    t = meta.training
    print(f"saved bridge {meta.bridge_id} to {out} (validation accuracy {t['validation_accuracy']:.4f} at step "
          f"{t['best_step']}, {t['parameters'] / 1e6:.2f}M parameters, {t['wall_time_s']} s)")
    return 0


__all__ = ["TrainConfig", "BridgeRun", "TrainRun", "Split", "train_jointly", "train_bridges", "make_bridge_runs",
           "lr_at", "batch_similarity", "pad_cat", "autocast_for", "default_sender_layer", "bridge_inputs",
           "wire_round_trip", "training_metadata", "describe_device", "TaskData", "labels_tensor", "DTYPES",
           "DEFAULT_SOFT_TOKENS", "DEFAULT_D_WIRE", "DEFAULT_WIRE_DTYPE", "SPLIT_SEED", "default_device",
           "resolve_device", "default_cache_dir", "fail", "train_command"]
