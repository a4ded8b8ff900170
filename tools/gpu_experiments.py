"""The whole GPU experiment: wire ablation → bridges for every task × seed → every baseline, on full test splits.

    python tools/gpu_experiments.py --role all --work runs/gpu --pack runs/gpu-out

Roles (every method's results merge into results/<task>.json under a file lock, so roles may also run as
separate processes; on one GPU that is slower — time-slicing — so run `--role all`):
  bridges    1. wire ablation on one task: K × d_wire bridges, one seed each, trained jointly; the default
                (K, d_wire, wire dtype) is the fewest bytes whose *validation* accuracy is within 1 point of the
                bf16 / full-width / K=16 reference;
             2. every task × seed with that default, trained jointly (each run its own optimizer, sampler, clip);
                the seed to ship is the best *by validation accuracy* (rows carved from train), never by test;
             3. the bridge method on the test splits (+ SST-2's labelled validation split);
  baselines  linear probe, sender/receiver zero-shot, receiver few-shot, text relay;
  prompt     prompt tuning (the bridge's budget: same steps, lr, batch, schedule; K vectors);
  sweep      recipe variants on one task (--sweep "K=8,d=64,L=24,lr=2e-4;K=32,d=256"), --sweep-seeds each, trained
             jointly; each variant's bridge rows (test + SST-2 validation) go to <work>/sweep/, with the carved
             validation accuracy that would choose among them; nothing is shipped
  pack       results.tar.gz (results/*.json, pipeline_*.json, runs' config.json + diagnostics.jsonl) into --pack;
  all        everything in turn, in one process.
The bridges role writes --pack/shipped_<task>.tar (the bridge to ship) as soon as the bridges are trained.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import time
from pathlib import Path

import torch

from telepathy.bridge.checkpoint import read_meta
from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.models import DEFAULT_RECEIVER, DEFAULT_SENDER
from telepathy.bridge.resampler import wire_bytes
from telepathy.bridge.tasks import BUILTIN_TASKS, resolve_task
from telepathy.bridge.training.data import load_split
from telepathy.bridge.training.evaluate import EvalSettings, evaluate_task, format_table
from telepathy.bridge.training.hidden_cache import StatesStore
from telepathy.bridge.training.train import (
    DEFAULT_D_WIRE,
    DEFAULT_SOFT_TOKENS,
    DEFAULT_WIRE_DTYPE,
    Split,
    TrainConfig,
    describe_device,
    labels_tensor,
    make_bridge_runs,
    train_bridges,
    train_jointly,
)

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


ROLE_METHODS = {
    "baselines": ["linear_probe", "sender_zero_shot", "receiver_zero_shot", "receiver_few_shot", "text_relay"],
    "prompt": ["prompt_tuning"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/gpu", help="working folder (bridges, results)")
    p.add_argument("--pack", default=None, help="folder for the archives to copy back from a GPU host (e.g. runs/gpu-out)")
    p.add_argument("--sender", default=DEFAULT_SENDER)
    p.add_argument("--receiver", default=DEFAULT_RECEIVER)
    p.add_argument("--tasks", default=",".join(BUILTIN_TASKS), help="comma list of built-in task names or task "
                                                                     "files (default: every built-in task)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--ablation-task", default=None, help="task of the wire ablation (default: the first of --tasks)")
    p.add_argument("--ablation-k", default="8,16,32")
    p.add_argument("--ablation-d-wire", default="full,256,64")
    p.add_argument("--reference-k", type=int, default=16)
    p.add_argument("--skip-ablation", action="store_true",
                   help="use --soft-tokens/--d-wire/--wire-dtype (the defaults are the recorded ablation's choice)")
    p.add_argument("--soft-tokens", type=int, default=DEFAULT_SOFT_TOKENS)
    p.add_argument("--d-wire", default=str(DEFAULT_D_WIRE))
    p.add_argument("--wire-dtype", default=DEFAULT_WIRE_DTYPE)
    p.add_argument("--prompt-soft-tokens", type=int, default=16, help="K of the prompt-tuning baseline")
    p.add_argument("--baseline-methods", default=",".join(ROLE_METHODS["baselines"] + ROLE_METHODS["prompt"]),
                   help="role all: the baselines to run after the bridges, in this order")
    p.add_argument("--prompt-tasks", default=None, help="tasks for prompt tuning (default: --tasks)")
    p.add_argument("--few-shot-tasks", default=None, help="tasks for few-shot (default: --tasks)")
    p.add_argument("--relay-tasks", default=None, help="tasks for the text relay (default: --tasks)")
    p.add_argument("--reuse-bridges", action="store_true",
                   help="role bridges/all: do not train; evaluate the bridges already in --work/runs/<task>/seed<s>")
    p.add_argument("--wire-dtypes", default="bf16,int8", help="wire dtypes the bridge is scored through")
    p.add_argument("--checkpoint-every", type=int, default=None, help="resumable checkpoints (default: at the end)")
    p.add_argument("--resume", action="store_true", help="continue the bridges from their checkpoints in --work")
    p.add_argument("--continue", dest="continue_run", action="store_true",
                   help="pick up an earlier, cut-short run in --work: phases it finished are skipped, trained bridges "
                        "reused, half-trained ones resumed from their checkpoints (the same command can be repeated)")
    p.add_argument("--states-cache", default=None, help="folder for sender hidden states on disk (default: memory)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="model dtype (default: bf16 on CUDA, fp32 on the CPU; bf16 is ~1.7x faster on a CPU with avx512_bf16)")
    p.add_argument("--train-limit", type=int, default=None, help="smoke runs: first N training rows")
    p.add_argument("--validation-size", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--limit", type=int, default=None, help="smoke runs: first N rows of each evaluated split")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--deadline-s", type=float, default=None, help="baselines: skip methods that would start after this")
    p.add_argument("--sweep", default="K=8,d=64;K=32,d=256", help="role sweep: ';'-separated variants of K, d (d_wire), "
                                                                    "L (sender layer), lr")
    p.add_argument("--sweep-task", default=None, help="task of the sweep (default: the first of --tasks)")
    p.add_argument("--sweep-seeds", type=int, default=2)
    p.add_argument("--role", default="all", choices=["all", "bridges", "baselines", "prompt", "sweep", "pack"],
                   help="bridges: ablation + bridges + their eval; baselines / prompt: the other methods "
                        "(three processes can share one GPU); pack: archive results; all: everything in turn")
    p.add_argument("--threads", type=int, default=4, help="CPU threads per process")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    first = next(t for t in args.tasks.split(",") if t)
    args.ablation_task, args.sweep_task = args.ablation_task or first, args.sweep_task or first
    return args


def d_wire_of(text: str, d_model: int) -> int:
    return d_model if text == "full" else int(text)


class Packer:
    """Archives for the --pack folder: results.tar.gz + shipped_<task>.tar, each replaced atomically."""

    def __init__(self, work: Path, pack: Path | None):
        self.work, self.pack = work, pack

    def _write(self, name: str, members: list[tuple[Path, str]], mode: str) -> None:
        if self.pack is None:
            return
        self.pack.mkdir(parents=True, exist_ok=True)
        tmp = self.pack / f".{name}.tmp"
        with tarfile.open(tmp, mode) as tar:
            for path, arcname in members:
                if path.is_file():
                    tar.add(path, arcname=arcname)
        os.replace(tmp, self.pack / name)

    def results(self) -> None:
        members = []
        for path in sorted(self.work.rglob("*")):
            rel = path.relative_to(self.work)
            if path.suffix in (".json", ".jsonl", ".md", ".txt") and "checkpoints" not in rel.parts:
                members.append((path, str(rel)))
        self._write("results.tar.gz", members, "w:gz")

    def shipped(self, task: str, folder: Path, pair: str) -> None:
        self._write(f"shipped_{task}.tar", [(folder / n, f"{pair}/{task}/{n}") for n in ("model.safetensors", "config.json")], "w")


def load_models(args, pipeline: dict) -> tuple[LanguageModel, LanguageModel]:
    t0 = time.perf_counter()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    sender = LanguageModel.load(args.sender, device=args.device, dtype=dtype)
    receiver = LanguageModel.load(args.receiver, device=args.device, dtype=dtype)
    pipeline["device"] = describe_device(receiver.device)
    pipeline["models"] = {"sender": sender.fingerprint().to_dict(), "receiver": receiver.fingerprint().to_dict()}
    log(f"models loaded in {time.perf_counter() - t0:.1f}s on {pipeline['device']}")
    return sender, receiver


def base_config(args) -> dict:
    return dict(sender=args.sender, receiver=args.receiver, d_model=args.d_model, depth=args.depth,
                num_heads=args.num_heads, steps=args.steps, batch_size=args.batch_size, eval_every=args.eval_every,
                checkpoint_every=args.checkpoint_every or args.steps, validation_size=args.validation_size,
                train_limit=args.train_limit,
                device=args.device)


def eval_settings(args, wire_dtype: str) -> EvalSettings:
    cuda = args.device.startswith("cuda")
    budget = {k: v for k, v in base_config(args).items() if k in ("steps", "batch_size", "eval_every")}
    return EvalSettings(seeds=args.seeds, limit=args.limit, wire_dtype=wire_dtype,
                        wire_dtypes=tuple(d for d in args.wire_dtypes.split(",") if d), batch_size=128 if cuda else 16,
                        relay_batch_size=384 if cuda else 64, progress=not args.no_progress, budget=budget,
                        soft_tokens=args.prompt_soft_tokens, train_limit=args.train_limit,
                        validation_size=args.validation_size)


def splits_of(task: str) -> list[str]:
    """The evaluation splits a task has: test, then validation where the task file names one."""
    return [s for s in ("test", "validation") if s in resolve_task(task).splits()]


def run_ablation(args, sender, receiver, store, work: Path) -> tuple[dict, dict]:
    """Phase 1: K × d_wire bridges on one task, one seed each, trained jointly; pick the wire default."""
    ks = [int(k) for k in args.ablation_k.split(",")]
    dws = [d_wire_of(d, args.d_model) for d in args.ablation_d_wire.split(",")]
    grid = [(k, d) for k in ks for d in dws]
    configs = [TrainConfig(task=args.ablation_task, soft_tokens=k, d_wire=d, seed=0, **base_config(args)) for k, d in grid]
    runs = make_bridge_runs(configs, sender, receiver, [work / "runs" / "ablation" / f"K{k}_d{d}" for k, d in grid],
                            store, names=[f"K{k}-d{d}" for k, d in grid])
    wall = train_jointly(runs, args.steps, desc=f"wire ablation ({args.ablation_task}, {len(runs)} bridges)",
                         progress=not args.no_progress)
    log(f"ablation: {len(runs)} bridges × {args.steps} steps in {wall:.1f}s ({1000 * wall / args.steps:.0f} ms/step)")
    test_rows = load_split(args.ablation_task, "test", limit=args.limit)
    layer = runs[0].bridge_config.sender_layer
    test = Split(store.get(sender, [r.text for r in test_rows], layer, runs[0].config.max_text_tokens),
                 labels_tensor(test_rows, receiver.device))
    rows = []
    for (k, d), run in zip(grid, runs):
        for dtype in ("bf16", "int8"):
            rows.append({"dtype": dtype, "d_wire": d, "soft_tokens": k, "bytes": wire_bytes(run.bridge_config, dtype),
                         "validation_accuracy": run.accuracy(run.validation, dtype),
                         "test_accuracy": run.accuracy(test, dtype), "best_step": run.best_step})
        (run.out_dir / "config.json").write_text(json.dumps({"name": run.name, "config": run.config.to_dict(),
                                                             "history": run.history}, indent=1))
    ref = next(r for r in rows if r["dtype"] == "bf16" and r["d_wire"] == args.d_model and r["soft_tokens"] == args.reference_k)
    ok = [r for r in rows if r["validation_accuracy"] >= ref["validation_accuracy"] - 0.01]
    best = min(ok, key=lambda r: (r["bytes"], -r["validation_accuracy"]))
    chosen = {"soft_tokens": best["soft_tokens"], "d_wire": best["d_wire"], "dtype": best["dtype"]}
    ablation = {
        "task": args.ablation_task, "split": "test", "n": len(test_rows), "seed": 0, "steps": args.steps,
        "rule": "fewest bytes whose validation accuracy (rows carved from train) is within 1 point of the "
                f"bf16 / d_wire={args.d_model} (full) / K={args.reference_k} reference",
        "reference": ref, "chosen": {**chosen, "bytes": best["bytes"]}, "rows": rows, "train_wall_s": round(wall, 1),
    }
    for r in sorted(rows, key=lambda r: r["bytes"]):
        log(f"  {r['dtype']:>4} d_wire={r['d_wire']:>3} K={r['soft_tokens']:>2} {r['bytes']:>6} B  "
            f"val {100 * r['validation_accuracy']:.1f}  test {100 * r['test_accuracy']:.1f}")
    log(f"chosen wire default: {chosen}")
    return chosen, ablation


def role_bridges(args, work: Path, results: Path, packer: Packer, pipeline: dict, phase_done, models) -> None:
    sender, receiver, store = models
    chosen = {"soft_tokens": args.soft_tokens, "d_wire": d_wire_of(args.d_wire, args.d_model), "dtype": args.wire_dtype}
    done = pipeline["phases"]
    if "ablation" in done:
        chosen = done["ablation"]["chosen"]
    elif not args.skip_ablation:
        t0 = time.perf_counter()
        chosen, ablation = run_ablation(args, sender, receiver, store, work)
        results.mkdir(parents=True, exist_ok=True)
        (results / "wire_ablation.json").write_text(json.dumps(ablation, indent=2) + "\n")
        phase_done("ablation", t0, chosen=chosen)

    t0 = time.perf_counter()
    tasks = [t for t in args.tasks.split(",") if t]
    configs = [TrainConfig(task=task, soft_tokens=chosen["soft_tokens"], d_wire=chosen["d_wire"], seed=seed,
                           **base_config(args)) for task in tasks for seed in range(args.seeds)]
    outs = [work / "runs" / c.task / f"seed{c.seed}" for c in configs]
    trained = "bridges" in done and all((out / "model.safetensors").exists() for out in outs)
    if args.reuse_bridges or trained:
        metas = [read_meta(out) for out in outs]
        log(f"bridges: reusing {len(metas)} trained bridges under {work / 'runs'}")
    else:
        resume = (args.resume or args.continue_run) and all(list((o / "checkpoints").glob("step_*/trainer_state.json")) for o in outs)
        metas = train_bridges(configs, outs, sender, receiver, store, names=[f"{c.task}-s{c.seed}" for c in configs],
                              desc=f"bridges ({len(configs)} trained jointly)", progress=not args.no_progress,
                              resume=resume)
    wall = metas[0].training["wall_time_s"]
    log(f"bridges: {len(configs)} × {args.steps} steps in {wall:.1f}s ({1000 * wall / args.steps:.0f} ms/step incl. setup)")
    pair = f"{args.sender}__{args.receiver}".replace("/", "_").replace(":", "_")
    shipped = {}
    for task in tasks:
        # The seed to ship is picked on validation accuracy (rows carved from train), never on test.
        cands = [(m.training["validation_accuracy"], -i, out) for i, (m, out) in enumerate(zip(metas, outs)) if m.task == task]
        val, _, out = max(cands)
        shipped[task] = {"from": str(out.relative_to(work)), "validation_accuracy": val,
                         "bytes": (out / "model.safetensors").stat().st_size}
        packer.shipped(task, out, pair)
        log(f"ship {task}: {out.name} (validation {100 * val:.1f}%, {shipped[task]['bytes'] / 1e6:.2f} MB)")
    if not trained:
        phase_done("bridges", t0, shipped=shipped, chosen=chosen, wall_s=metas[0].training["wall_time_s"])

    if "eval_bridge" in done:
        log("bridge rows: already evaluated")
        return
    t0 = time.perf_counter()
    settings = eval_settings(args, chosen["dtype"])
    for task in tasks:
        dirs = [out for out, c in zip(outs, configs) if c.task == task]
        evaluate_task(task, sender, receiver, dirs, ["bridge"], results / f"{task}.json", splits_of(task), settings, store)
    phase_done("eval_bridge", t0)


def role_baselines(args, work: Path, results: Path, methods: list[str], pipeline: dict, phase_done, models) -> None:
    sender, receiver, store = models
    settings = eval_settings(args, "int8")
    for method in methods:
        if f"eval_{method}" in pipeline["phases"]:
            log(f"{method}: already evaluated")
            continue
        if args.deadline_s is not None and time.perf_counter() - T0 > args.deadline_s:
            log(f"skipping {method}: past the deadline")
            continue
        t0 = time.perf_counter()
        tasks = [t for t in args.tasks.split(",") if t]
        only = {"prompt_tuning": args.prompt_tasks, "receiver_few_shot": args.few_shot_tasks,
                "text_relay": args.relay_tasks}.get(method)
        if only is not None:
            tasks = [t for t in only.split(",") if t]
        for task in tasks:
            evaluate_task(task, sender, receiver, [], [method], results / f"{task}.json", splits_of(task), settings, store)
            log(f"{method}: {task} done")
        phase_done(f"eval_{method}", t0)


SWEEP_KEYS = {"K": ("soft_tokens", int), "d": ("d_wire", int), "L": ("sender_layer", int), "lr": ("lr", float)}


def parse_sweep(text: str) -> list[dict]:
    variants = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        variant = {}
        for item in part.split(","):
            key, _, value = item.partition("=")
            if key.strip() not in SWEEP_KEYS:
                raise SystemExit(f"--sweep: unknown key {key!r} (known: {', '.join(SWEEP_KEYS)})")
            field, cast = SWEEP_KEYS[key.strip()]
            variant[field] = cast(value)
        variants.append(variant)
    return variants


def variant_name(variant: dict) -> str:
    short = {field: key for key, (field, _) in SWEEP_KEYS.items()}
    return "_".join(f"{short[k]}{v}" for k, v in variant.items()) or "default"


def role_sweep(args, work: Path, pipeline: dict, phase_done, models) -> None:
    """Recipe variants on one task, --sweep-seeds each; rows for the record (selection by carved validation)."""
    sender, receiver, store = models
    task, done, t0 = args.sweep_task, pipeline["phases"], time.perf_counter()
    variants = parse_sweep(args.sweep)
    configs, outs, names, dirs_of = [], [], [], {}
    for variant in variants:
        name = variant_name(variant)
        dirs_of[name] = [work / "sweep" / task / name / f"seed{seed}" for seed in range(args.sweep_seeds)]
        for seed, out in enumerate(dirs_of[name]):
            configs.append(TrainConfig(task=task, seed=seed, **{**base_config(args), **variant}))
            outs.append(out)
            names.append(f"{name}-s{seed}")
    if "sweep_train" in done and all((o / "model.safetensors").exists() for o in outs):
        metas = [read_meta(o) for o in outs]
    else:
        resume = args.continue_run and all(list((o / "checkpoints").glob("step_*/trainer_state.json")) for o in outs)
        metas = train_bridges(configs, outs, sender, receiver, store, names=names, resume=resume,
                              desc=f"sweep ({len(configs)} trained jointly)", progress=not args.no_progress)
        phase_done("sweep_train", t0, wall_s=metas[0].training["wall_time_s"])
    t0 = time.perf_counter()
    settings = eval_settings(args, args.wire_dtype)
    rows = []
    for variant in variants:
        name = variant_name(variant)
        dirs = dirs_of[name]
        docs = evaluate_task(task, sender, receiver, dirs, ["bridge"], work / "sweep" / f"{task}_{name}.json",
                             splits_of(task), settings, store)
        carved = [read_meta(d).training["validation_accuracy"] for d in dirs]
        row = {"variant": variant, "name": name, "carved_validation": carved,
               "carved_validation_mean": sum(carved) / len(carved)}
        for split, doc in docs.items():
            row[split] = doc["methods"]["bridge"]["accuracy"]
        rows.append(row)
        log(f"sweep {name}: carved validation {[round(100 * c, 1) for c in carved]} "
            + " ".join(f"{k} {[round(100 * a, 1) for a in row[k]]}" for k in docs))
    (work / "sweep" / f"sweep_{task}.json").write_text(json.dumps(
        {"task": task, "steps": args.steps, "seeds": args.sweep_seeds, "rows": rows,
         "note": "choose by carved_validation (rows carved from train); test shown, never used to choose"}, indent=2) + "\n")
    phase_done("sweep_eval", t0)


def print_tables(results: Path) -> None:
    for path in sorted(results.glob("*.json")):
        doc = json.loads(path.read_text())
        if "methods" in doc:
            print(format_table(doc), flush=True)
    ablation = results / "wire_ablation.json"
    if ablation.exists():
        a = json.loads(ablation.read_text())
        print(f"wire default: {a['chosen']} (reference {a['reference']['validation_accuracy']:.3f} val)", flush=True)




def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = work / "results"
    packer = Packer(work, Path(args.pack) if args.pack else None)
    import transformers

    pipeline: dict = {"argv": sys.argv[1:], "role": args.role, "phases": {}, "python": platform.python_version(),
                      "torch": torch.__version__, "transformers": transformers.__version__,
                      "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    earlier = work / f"pipeline_{args.role}.json"
    if args.continue_run and earlier.exists():
        before = json.loads(earlier.read_text())
        pipeline["phases"] = before.get("phases", {})
        pipeline["earlier_elapsed_s"] = before.get("elapsed_s", 0) + before.get("earlier_elapsed_s", 0)
        log(f"continuing: phases already done: {', '.join(pipeline['phases']) or 'none'}")

    def phase_done(name: str, t0: float, **info) -> None:
        pipeline["phases"][name] = {"wall_s": round(time.perf_counter() - t0, 1), **info}
        pipeline["elapsed_s"] = round(time.perf_counter() - T0, 1)
        (work / f"pipeline_{args.role}.json").write_text(json.dumps(pipeline, indent=2) + "\n")
        log(f"phase {name} done in {time.perf_counter() - t0:.1f}s")

    torch.set_num_threads(args.threads)
    if args.role != "pack":
        sender, receiver = load_models(args, pipeline)
        models = (sender, receiver, StatesStore(args.states_cache, batch_size=256 if args.device.startswith("cuda") else 32))
    if args.role == "sweep":
        role_sweep(args, work, pipeline, phase_done, models)
    if args.role in ("bridges", "all"):
        role_bridges(args, work, results, packer, pipeline, phase_done, models)
    if args.role == "all":
        methods = [m for m in args.baseline_methods.split(",") if m]
        role_baselines(args, work, results, methods, pipeline, phase_done, models)
    elif args.role in ROLE_METHODS:
        role_baselines(args, work, results, ROLE_METHODS[args.role], pipeline, phase_done, models)
    if args.role in ("pack", "all"):
        packer.results()
        print_tables(results)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
