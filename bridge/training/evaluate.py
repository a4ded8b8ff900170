"""Fair evaluation of the bridge against the baselines (bridge.baselines) on full test splits.

    telepathy eval --task trec --bridge runs/trec --methods all --seeds 3 --out results/trec.json

`--bridge` is a bridge folder or a folder of them (seed0/, seed1/, …): the first `--seeds` found are the
bridge's seeds, each an independently trained bridge. Seeded baselines (few-shot demonstrations, prompt
tuning) use seeds 0..seeds-1; deterministic methods (zero-shot, text relay, linear probe) run once and report
one value. Prompt tuning trains with the bridge's own recorded budget (steps, lr, batch, schedule, K) on the
same training rows, and the linear probe reads the same sender layer. Every method scores labels the same way.

`--task` is a built-in task's name or the path of a task file (docs/TASKS.md). results/<task>.json:
    {"task", "labels", "split", "n", "sender", "receiver",
     "methods": {NAME: {"accuracy": [per seed], "mean", "std", ...details}},
     "wire": {"dtype", "soft_tokens", "d_wire", "bytes_per_request", "bridge_accuracy_by_dtype", ...}}
Further splits (`--splits test,validation`) go to <out stem>_<split>.json. Methods merge into an existing file for
the same task/split/models, so methods can be run in several calls.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock

from telepathy.bridge.checkpoint import BridgeMeta, CheckpointError, check_task, find_bridges, load_bridge
from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.resampler import wire_bytes
from telepathy.bridge.runtime.engine import BridgeSet, ReceiverEngine
from telepathy.bridge.tasks import Task, TaskFileError, UnknownTaskError, resolve_task
from telepathy.bridge.training.baselines import (
    PromptTuningRun,
    accuracy,
    classify_relayed,
    few_shot,
    linear_probe,
    pick_shots,
    prompt_split,
    relay_texts,
    truncate_texts,
    zero_shot,
)
from telepathy.bridge.training.data import Example, load_split, train_validation_split
from telepathy.bridge.training.hidden_cache import StatesStore
from telepathy.bridge.training.train import (
    DEFAULT_WIRE_DTYPE,
    DTYPES,
    SPLIT_SEED,
    TrainConfig,
    autocast_for,
    bridge_inputs,
    default_sender_layer,
    fail,
    resolve_device,
    train_jointly,
)

METHODS = ("bridge", "sender_zero_shot", "receiver_zero_shot", "receiver_few_shot", "text_relay", "prompt_tuning",
           "linear_probe")
WIRE_DTYPES_REPORTED = ("bf16", "int8")
BUDGET_KEYS = ("steps", "lr", "batch_size", "weight_decay", "warmup_steps", "grad_clip", "min_lr_ratio", "eval_every")


@dataclass
class EvalSettings:
    seeds: int = 3  # bridges / few-shot draws / prompt-tuning runs
    few_shot_k: int = 2  # demonstrations per class
    relay_tokens: int = 48  # max new tokens of the sender's relay text (greedy)
    max_text_tokens: int = 256  # every method reads at most this many tokens of the input (the bridge's limit)
    batch_size: int = 64  # prompts per forward for the text methods
    relay_batch_size: int = 128
    limit: int | None = None  # evaluate only the first rows of each split (smoke runs, tests)
    wire_dtype: str = DEFAULT_WIRE_DTYPE  # what the bridge's `accuracy` goes through (the serving default)
    wire_dtypes: tuple[str, ...] = WIRE_DTYPES_REPORTED  # the bridge is also scored through these (the "wire" block)
    progress: bool = True
    # Without bridges (baselines run on their own), the training budget and data of the bridges they stand beside:
    budget: dict = field(default_factory=dict)  # TrainConfig fields (steps, lr, batch_size, …); default TrainConfig's
    soft_tokens: int = 16  # K of the prompt-tuning baseline
    train_limit: int | None = None
    validation_size: int = 500

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.few_shot_k < 1 or self.relay_tokens < 1 or self.max_text_tokens < 1:
            raise ValueError("seeds, few_shot_k, relay_tokens and max_text_tokens must be ≥ 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be ≥ 1, got {self.limit}")
        self.wire_dtypes = tuple(dict.fromkeys([*self.wire_dtypes, self.wire_dtype]))  # always includes wire_dtype


def summarize(values: list[float], **extra) -> dict:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"accuracy": [round(v, 6) for v in values], "mean": round(mean, 6), "std": round(std, 6), **extra}


def resolve_bridge_dirs(path: str | Path) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"bridge folder {path} does not exist")
    found = find_bridges(path)
    if not found:
        raise CheckpointError(f"no bridge checkpoint (config.json + model.safetensors) under {path}")
    return found


class TaskEvaluation:
    """Everything needed to evaluate one task on some splits; methods fill `self.results[split][method]`."""

    def __init__(self, task: Task, sender: LanguageModel, receiver: LanguageModel, bridge_dirs: list[Path],
                 splits: list[str], settings: EvalSettings, store: StatesStore | None = None):
        self.loaded_task = task
        self.spec = task.spec
        self.task = task.name
        self.sender, self.receiver = sender, receiver
        self.settings = settings
        self.store = store or StatesStore()
        self.bridges: list[tuple[torch.nn.Module, BridgeMeta]] = []
        for d in bridge_dirs[: settings.seeds]:
            bridge, meta = load_bridge(d, sender.fingerprint(), receiver.fingerprint(), device=str(receiver.device))
            check_task(meta, task)
            self.bridges.append((bridge, meta))
        # Prompt tuning gets the bridge's recorded budget and both read the same rows and sender layer.
        if self.bridges:
            meta = self.bridges[0][1]
            training = meta.training
            self.layer, self.soft_tokens = meta.config.sender_layer, meta.config.num_latents
            self.budget = {k: training[k] for k in BUDGET_KEYS if k in training}
            self.validation_size = int(training.get("validation_size", 500))
            train_rows = training.get("train_rows")
        else:
            self.layer, self.soft_tokens = default_sender_layer(sender.num_layers), settings.soft_tokens
            self.budget = {k: v for k, v in settings.budget.items() if k in BUDGET_KEYS}
            self.validation_size = settings.validation_size
            train_rows = settings.train_limit
        train, validation = train_validation_split(task, self.validation_size, seed=SPLIT_SEED)
        self.train = train[: int(train_rows)] if train_rows else train
        self.validation = validation
        self.rows = {s: load_split(task, s, limit=settings.limit) for s in splits}
        self.results: dict[str, dict[str, dict]] = {s: {} for s in splits}
        self.wire: dict[str, dict] = {s: {} for s in splits}
        self.timings: dict[str, float] = {}

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _texts(self, lm: LanguageModel, rows: list[Example]) -> list[str]:
        return truncate_texts(lm, [r.text for r in rows], self.settings.max_text_tokens)

    def _states(self, rows: list[Example]):
        return self.store.get(self.sender, [r.text for r in rows], self.layer, self.settings.max_text_tokens)

    # ---- methods ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def bridge(self) -> None:
        if not self.bridges:
            raise CheckpointError("method 'bridge' needs --bridge")
        engine = ReceiverEngine(self.receiver, BridgeSet([]))
        device = self.receiver.device
        for split, rows in self.rows.items():
            states = self._states(rows)
            labels = torch.tensor([r.label for r in rows])
            by_dtype: dict[str, list[float]] = {d: [] for d in self.settings.wire_dtypes}
            for bridge, meta in self.bridges:
                label_ids = self.receiver.label_token_ids(tuple(meta.verbalizers))
                for dtype in by_dtype:
                    preds = []
                    for start in range(0, len(rows), 512):
                        s, m = states.batch(range(start, min(len(rows), start + 512)))
                        with autocast_for(device):
                            embeds, mask, _ = bridge_inputs(bridge, engine, meta, s, m, dtype)
                        preds.append(self.receiver.label_logits(embeds, mask, label_ids).argmax(-1).cpu())
                    by_dtype[dtype].append(float((torch.cat(preds) == labels).float().mean()))
            cfg = self.bridges[0][1].config
            self.results[split]["bridge"] = summarize(
                by_dtype[self.settings.wire_dtype], wire_dtype=self.settings.wire_dtype,
                validation_accuracy=[m.training.get("validation_accuracy") for _, m in self.bridges],
                bridge_ids=[m.bridge_id for _, m in self.bridges],
            )
            self.wire[split] = {
                "dtype": self.settings.wire_dtype, "soft_tokens": cfg.num_latents, "d_wire": cfg.d_wire,
                "d_model": cfg.d_model, "sender_layer": cfg.sender_layer,
                "bytes_per_request": {d: wire_bytes(cfg, d) for d in WIRE_DTYPES_REPORTED},  # both, whatever was scored
                "bridge_accuracy_by_dtype": {d: summarize(v) for d, v in by_dtype.items()},
                **({k: v for k, v in self.wire[split].items() if k.startswith("text_relay")}),
            }

    def sender_zero_shot(self) -> None:
        for split, rows in self.rows.items():
            lp = zero_shot(self.sender, self.spec, self._texts(self.sender, rows), self.settings.batch_size)
            self.results[split]["sender_zero_shot"] = summarize([accuracy(lp, rows)], deterministic=True)

    def receiver_zero_shot(self) -> None:
        for split, rows in self.rows.items():
            lp = zero_shot(self.receiver, self.spec, self._texts(self.receiver, rows), self.settings.batch_size)
            self.results[split]["receiver_zero_shot"] = summarize([accuracy(lp, rows)], deterministic=True)

    def receiver_few_shot(self) -> None:
        k = self.settings.few_shot_k
        shots = [pick_shots(self.train, self.spec, k, seed) for seed in range(self.settings.seeds)]
        shots = [[(truncate_texts(self.receiver, [t], self.settings.max_text_tokens)[0], y) for t, y in s] for s in shots]
        for split, rows in self.rows.items():
            texts = self._texts(self.receiver, rows)
            accs = [accuracy(few_shot(self.receiver, self.spec, texts, s, max(1, self.settings.batch_size // 2)), rows)
                    for s in shots]
            self.results[split]["receiver_few_shot"] = summarize(accs, k_per_class=k, shots=len(shots[0]))

    def text_relay(self) -> None:
        for split, rows in self.rows.items():
            relayed = relay_texts(self.sender, self.spec, self._texts(self.sender, rows), self.settings.relay_tokens,
                                  self.settings.relay_batch_size, self.settings.progress)
            lp = classify_relayed(self.receiver, self.spec, relayed, self.settings.batch_size)
            n_bytes = [len(t.encode("utf-8")) for t in relayed]
            self.results[split]["text_relay"] = summarize(
                [accuracy(lp, rows)], deterministic=True, max_new_tokens=self.settings.relay_tokens,
                mean_relay_bytes=round(sum(n_bytes) / max(1, len(n_bytes)), 1),
                examples=[{"text": r.text[:200], "relay": t, "label": self.spec.labels[r.label]}
                          for r, t in list(zip(rows, relayed))[:5]],
            )
            self.wire[split]["text_relay_mean_bytes"] = round(sum(n_bytes) / max(1, len(n_bytes)), 1)

    def prompt_tuning(self) -> None:
        runs = []
        train = prompt_split(self.receiver, self.spec, self.train, self.settings.max_text_tokens)
        val = prompt_split(self.receiver, self.spec, self.validation, self.settings.max_text_tokens)
        for seed in range(self.settings.seeds):
            config = TrainConfig(task=self.loaded_task.reference, sender=self.sender.spec, receiver=self.receiver.spec,
                                 soft_tokens=self.soft_tokens, seed=seed, diversity_weight=0.0,
                                 validation_size=self.validation_size, device=str(self.receiver.device), **self.budget)
            runs.append(PromptTuningRun(f"prompt-{self.task}-seed{seed}", config, self.receiver, train, val))
        wall = train_jointly(runs, runs[0].config.steps, progress=self.settings.progress, desc=f"prompt tuning {self.task}")
        for split, rows in self.rows.items():
            test = prompt_split(self.receiver, self.spec, rows, self.settings.max_text_tokens)
            accs = [run.accuracy(test, batch_size=self.settings.batch_size) for run in runs]
            self.results[split]["prompt_tuning"] = summarize(
                accs, validation_accuracy=[r.best_accuracy for r in runs], soft_tokens=self.soft_tokens,
                steps=runs[0].config.steps, lr=runs[0].config.lr, batch_size=runs[0].config.batch_size,
                train_wall_time_s=round(wall, 1),
            )

    def linear_probe(self) -> None:
        feats = lambda rows: self._states(rows).mean_pooled()  # noqa: E731
        y = lambda rows: torch.tensor([r.label for r in rows])  # noqa: E731
        splits = list(self.rows)
        result = linear_probe(feats(self.train), y(self.train), feats(self.validation), y(self.validation),
                              [feats(self.rows[s]) for s in splits], self.spec.num_labels)
        for split, pred in zip(splits, result.predictions):
            labels = torch.tensor([r.label for r in self.rows[split]])
            acc = float((pred == labels).float().mean())
            self.results[split]["linear_probe"] = summarize(
                [acc], deterministic=True, l2=result.l2, validation_accuracy=round(result.validation_accuracy, 6),
                sender_layer=self.layer, features="mean-pooled sender states",
            )

    # ---- driver -----------------------------------------------------------------------------------------------
    def run(self, methods: list[str], on_done=None) -> None:
        for method in methods:
            t0 = time.perf_counter()
            getattr(self, method)()
            self.timings[method] = round(time.perf_counter() - t0, 1)
            for split in self.results:
                if method in self.results[split]:
                    self.results[split][method]["wall_time_s"] = self.timings[method]
            if on_done is not None:
                on_done(method)

    def document(self, split: str) -> dict:
        return {
            "task": self.task, "labels": list(self.spec.labels), "split": split, "n": len(self.rows[split]),
            "sender": self.sender.spec,
            "receiver": self.receiver.spec, "methods": self.results[split], "wire": self.wire[split],
            "settings": {"seeds": self.settings.seeds, "few_shot_k": self.settings.few_shot_k,
                         "relay_tokens": self.settings.relay_tokens, "max_text_tokens": self.settings.max_text_tokens,
                         "validation": f"{self.validation_size} rows carved from train (split seed {SPLIT_SEED})",
                         "train_rows": len(self.train), "sender_layer": self.layer,
                         "prompt_tuning_budget": {"soft_tokens": self.soft_tokens, **{
                             k: getattr(TrainConfig(task=self.loaded_task.reference, **self.budget), k) for k in BUDGET_KEYS}}},
        }


def merge_results(path: Path, document: dict) -> dict:
    """Write `document` to `path`, keeping methods of an existing file for the same task/split/n/models."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_name(f".{path.name}.lock"))):  # several processes may add methods at once
        if path.exists():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                old = {}
            same = all(old.get(k) == document[k] for k in ("task", "split", "n", "sender", "receiver"))
            if same:
                methods = {**old.get("methods", {}), **document["methods"]}
                wire = {**old.get("wire", {}), **document["wire"]}
                settings = {**old.get("settings", {}), **document.get("settings", {})}
                document = {**document, "methods": methods, "wire": wire, "settings": settings}
        ordered = {m: document["methods"][m] for m in METHODS if m in document["methods"]}
        document = {**document, "methods": ordered}
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return document


def output_paths(out: Path, splits: list[str]) -> dict[str, Path]:
    """The first split goes to `out`; others to <stem>_<split>.json beside it."""
    return {s: out if i == 0 else out.with_name(f"{out.stem}_{s}{out.suffix}") for i, s in enumerate(splits)}


def evaluate_task(task: Task | str, sender: LanguageModel, receiver: LanguageModel, bridge_dirs: list[Path],
                  methods: list[str], out: Path, splits: list[str] = ("test",), settings: EvalSettings | None = None,
                  store: StatesStore | None = None) -> dict[str, dict]:
    """Run `methods` and write results after each one (a run cut short keeps what it finished)."""
    settings = settings or EvalSettings()
    task = task if isinstance(task, Task) else resolve_task(task)  # a built-in name or a task file's path
    ev = TaskEvaluation(task, sender, receiver, bridge_dirs, list(splits), settings, store)
    paths = output_paths(Path(out), list(splits))
    documents: dict[str, dict] = {}

    def write(_method: str) -> None:
        for split, path in paths.items():
            documents[split] = merge_results(path, ev.document(split))

    ev.run(methods, on_done=write)
    return documents


def format_table(document: dict) -> str:
    lines = [f"{document['task']} / {document['split']} (n = {document['n']}): {document['sender']} → {document['receiver']}"]
    for name, entry in document["methods"].items():
        seeds = len(entry["accuracy"])
        lines.append(f"  {name:<20} {100 * entry['mean']:6.2f} ± {100 * entry['std']:5.2f}  ({seeds} seed{'s' if seeds > 1 else ''})")
    wire = document.get("wire") or {}
    if "bytes_per_request" in wire:
        lines.append(f"  wire: K={wire['soft_tokens']} × d_wire={wire['d_wire']} {wire['dtype']} = "
                     f"{wire['bytes_per_request'][wire['dtype']]} B/request")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI
# `telepathy eval`: the arguments are in telepathy.commands (torch-free, for a fast `--help`).


def parse_methods(text: str) -> list[str]:
    if text.strip() == "all":
        return list(METHODS)
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown or [text]}; known: all, {', '.join(METHODS)}")
    return methods


def eval_command(args: argparse.Namespace) -> int:
    from telepathy.bridge.models import DEFAULT_RECEIVER, DEFAULT_SENDER, ModelSpecError

    try:
        task = resolve_task(args.task)
        methods = parse_methods(args.methods)
        settings = EvalSettings(seeds=args.seeds, few_shot_k=args.few_shot_k, limit=args.limit,
                                batch_size=args.batch_size, progress=not args.no_progress)
    except (UnknownTaskError, ValueError) as exc:
        return fail("eval", str(exc))
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    bridge_dirs: list[Path] = []
    sender_spec, receiver_spec = args.sender or DEFAULT_SENDER, args.receiver or DEFAULT_RECEIVER
    if args.bridge:
        try:
            bridge_dirs = resolve_bridge_dirs(args.bridge)
            from telepathy.bridge.checkpoint import read_meta

            first = read_meta(bridge_dirs[0])
        except CheckpointError as exc:
            return fail("eval", str(exc))
        try:
            check_task(first, task)
        except CheckpointError as exc:
            return fail("eval", str(exc))
        sender_spec = args.sender or first.training.get("sender") or first.sender.spec
        receiver_spec = args.receiver or first.training.get("receiver") or first.receiver.spec
    elif "bridge" in methods:
        if args.methods.strip() != "all":
            return fail("eval", "method 'bridge' needs --bridge")
        methods = [m for m in methods if m != "bridge"]  # all baselines, with the default budget
    try:
        for split in dict.fromkeys(["train", *splits]):  # train: few-shot demonstrations, prompt tuning, the probe
            load_split(task, split)
    except TaskFileError as exc:
        return fail("eval", str(exc))
    device = resolve_device(args.device)
    try:
        sender = LanguageModel.load(sender_spec, device=device, dtype=DTYPES.get(args.dtype))
        receiver = LanguageModel.load(receiver_spec, device=device, dtype=DTYPES.get(args.dtype))
    except (ModelSpecError, FileNotFoundError) as exc:
        return fail("eval", str(exc))
    try:
        task.check_verbalizers(receiver.tokenizer, receiver.spec)
        if {"sender_zero_shot"} & set(methods):  # the one method that scores labels with the sender's tokenizer
            task.check_verbalizers(sender.tokenizer, sender.spec)
    except TaskFileError as exc:
        return fail("eval", str(exc))
    store = StatesStore(args.cache_dir)
    try:
        documents = evaluate_task(task, sender, receiver, bridge_dirs, methods, Path(args.out), splits, settings,
                                  store)
    except (CheckpointError, TaskFileError) as exc:
        return fail("eval", str(exc))
    for split, path in output_paths(Path(args.out), splits).items():
        print(format_table(documents[split]))
        print(f"  → {path}")
    return 0
