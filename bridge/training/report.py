"""Results → a markdown table and a bar chart.

    telepathy report --results results --out results [--task T ...]
    telepathy report --curves RUN_DIR [RUN_DIR ...] [--out curves.png]

reads results/<task>[_<split>].json (written by `telepathy eval`) and results/wire_ablation.json (if present)
and writes results/summary.md (methods × tasks, mean ± std over seeds, in %) and results/accuracy.png
(grouped bars with ±std error bars and each task's chance level). Chance needs the number of labels: a results file
records its labels; older ones get them from the --task given for them (a built-in name or a task file) or the
built-in task of their name.

With --curves it reads each run folder's diagnostics.jsonl (written by `telepathy train`: per-step rows with loss, lr,
...; rows with val_accuracy at each evaluation) and writes one PNG of loss (and validation accuracy where present) vs
step, a line per run named by its folder, and the plotted data beside it (the same path with .json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from telepathy.bridge.tasks import BUILTIN_TASKS, TaskSpec, UnknownTaskError, resolve_task
from telepathy.bridge.training.config import fail
from telepathy.bridge.training.evaluate import METHODS


def load_results(folder: str | Path, tasks: list[TaskSpec] | None = None) -> list[dict]:
    """Every evaluation document in `folder` (files with task/split/methods), in task then split order: the order of
    `tasks` when given (and only those tasks), else the built-ins' order, then other tasks by name. Each document
    gets `labels` if it lacks them (from `tasks` or the built-ins); ValueError when they are nowhere to be had."""
    specs = {spec.name: spec for spec in tasks or []}
    docs = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        if isinstance(doc, dict) and {"task", "split", "methods"} <= set(doc):
            docs.append(doc)
    if tasks:
        docs = [d for d in docs if d["task"] in specs]
    for d in docs:
        if "labels" not in d:
            spec = specs.get(d["task"]) or BUILTIN_TASKS.get(d["task"])
            if spec is None:
                raise ValueError(f"results for task {d['task']!r} ({d['split']}) do not record its labels and it is "
                                 "not a built-in task: pass its task file with --task")
            d["labels"] = list(spec.labels)
    order = list(specs) or list(BUILTIN_TASKS)
    rank = {t: i for i, t in enumerate(order)}
    return sorted(docs, key=lambda d: (rank.get(d["task"], len(order)), d["task"], d["split"] != "test", d["split"]))


def chance(doc: dict) -> float:
    """The accuracy of guessing, in %: 100 / the number of labels (recorded in the document, else the built-in's)."""
    labels = doc.get("labels") or BUILTIN_TASKS[doc["task"]].labels
    return 100 / len(labels)


def column_name(doc: dict) -> str:
    return f"{doc['task']} {doc['split']} (n={doc['n']})"


def markdown_table(docs: list[dict]) -> str:
    """Methods as rows, task/split as columns; the best mean of each column in bold."""
    if not docs:
        return "_no results_\n"
    methods = [m for m in METHODS if any(m in d["methods"] for d in docs)]
    header = "| method | " + " | ".join(column_name(d) for d in docs) + " |"
    lines = [header, "|---|" + "---:|" * len(docs)]
    best = [max((e["mean"] for e in d["methods"].values()), default=None) for d in docs]
    for m in methods:
        cells = []
        for d, top in zip(docs, best):
            e = d["methods"].get(m)
            if e is None:
                cells.append("–")
                continue
            n = len(e["accuracy"])
            text = f"{100 * e['mean']:.1f} ± {100 * e['std']:.1f}" if n > 1 else f"{100 * e['mean']:.1f}"
            cells.append(f"**{text}**" if e["mean"] == top else text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append(f"| _chance_ | {' | '.join(f'{chance(d):.1f}' for d in docs)} |")
    return "\n".join(lines) + "\n"


def wire_table(ablation: dict) -> str:
    rows = ablation.get("rows", [])
    lines = ["| wire dtype | d_wire | K | bytes / request | validation acc | test acc |", "|---|---:|---:|---:|---:|---:|"]
    chosen = ablation.get("chosen") or {}
    for r in sorted(rows, key=lambda r: (r["bytes"], r["dtype"])):
        mark = " ← default" if all(r.get(k) == chosen.get(k) for k in ("dtype", "d_wire", "soft_tokens")) else ""
        lines.append(f"| {r['dtype']} | {r['d_wire']} | {r['soft_tokens']} | {r['bytes']:,} | "
                     f"{100 * r['validation_accuracy']:.1f} | {100 * r['test_accuracy']:.1f}{mark} |")
    return "\n".join(lines) + "\n"


def bar_chart(docs: list[dict], path: str | Path) -> Path:
    plt = _pyplot()
    methods = [m for m in METHODS if any(m in d["methods"] for d in docs)]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(7.0, 2.4 * len(docs)), 4.5))
    colors = plt.get_cmap("tab10")
    for j, m in enumerate(methods):
        xs, ys, errs = [], [], []
        for i, d in enumerate(docs):
            e = d["methods"].get(m)
            if e is not None:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(100 * e["mean"])
                errs.append(100 * e["std"])
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=m, color=colors(j))
    for i, d in enumerate(docs):
        ax.hlines(chance(d), i - 0.45, i + 0.45, colors="black", linestyles="dotted", linewidth=1)
    ax.set_xticks(range(len(docs)))
    ax.set_xticklabels([column_name(d) for d in docs], fontsize=9)
    ax.set_ylabel("accuracy (%), mean ± std over seeds")
    ax.set_ylim(0, 100)
    sender = docs[0]["sender"] if docs else ""
    receiver = docs[0]["receiver"] if docs else ""
    ax.set_title(f"{sender} → {receiver}: all methods per task (dotted: chance)", fontsize=10)
    ax.legend(fontsize=8, ncol=4, loc="lower center", bbox_to_anchor=(0.5, -0.32))
    return _save(fig, path)


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (imported late: the rest of the report needs no matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def write_report(results: str | Path, out: str | Path, tasks: list[TaskSpec] | None = None) -> list[Path]:
    results, out = Path(results), Path(out)
    docs = load_results(results, tasks)
    if not docs:
        raise FileNotFoundError(f"no evaluation results (*.json with task/split/methods) in {results}")
    out.mkdir(parents=True, exist_ok=True)
    text = "# Accuracy (%) per method, mean ± std over seeds\n\n" + markdown_table(docs)
    ablation_path = results / "wire_ablation.json"
    if ablation_path.exists():
        ablation = json.loads(ablation_path.read_text(encoding="utf-8"))
        text += f"\n# Wire ablation ({ablation.get('task')}, one seed per row)\n\n" + wire_table(ablation)
    written = [out / "summary.md", bar_chart(docs, out / "accuracy.png")]
    written[0].write_text(text, encoding="utf-8")
    return written


class CurvesError(ValueError):
    """A run folder's diagnostics cannot be plotted: missing, empty or malformed (the message names the file)."""


def load_curves(run_dir: str | Path) -> dict:
    """One run's curves from RUN_DIR/diagnostics.jsonl: {"run", "diagnostics", "loss": [[step, loss], ...],
    "val_accuracy": [[step, acc], ...]}. CurvesError when the file is missing, empty, or a line is not a JSON object
    with an integer step (and a number for loss / val_accuracy where given), or no row has a loss."""
    run_dir = Path(run_dir)
    path = run_dir / "diagnostics.jsonl"
    if not path.is_file():
        raise CurvesError(f"{path}: no such file (is {run_dir} a `telepathy train` run folder?)")
    loss: list[list[float]] = []
    val: list[list[float]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    if not any(line.strip() for line in lines):
        raise CurvesError(f"{path}: empty (no training steps recorded)")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise CurvesError(f"{path}: line {number} is not JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row["step"], bool):
            raise CurvesError(f"{path}: line {number} is not an object with an integer step")
        for key, into in (("loss", loss), ("val_accuracy", val)):
            if key in row:
                value = row[key]
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise CurvesError(f"{path}: line {number}: {key} is not a number")
                into.append([row["step"], value])
    if not loss:
        raise CurvesError(f"{path}: no row with a loss")
    return {"run": run_dir.resolve().name, "diagnostics": str(path), "loss": loss, "val_accuracy": val}


def curves_chart(runs: list[dict], path: str | Path) -> Path:
    """Loss vs step (left axes) and, when any run has them, validation accuracy vs step (right axes) in one PNG."""
    plt = _pyplot()
    with_val = any(r["val_accuracy"] for r in runs)
    fig, axes = plt.subplots(1, 2 if with_val else 1, figsize=(12.0 if with_val else 7.0, 4.5), squeeze=False)
    colors = plt.get_cmap("tab10")
    loss_ax = axes[0][0]
    for i, r in enumerate(runs):
        steps, values = zip(*r["loss"])
        loss_ax.plot(steps, values, label=r["run"], color=colors(i % 10), linewidth=1.2)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_title("loss", fontsize=10)
    loss_ax.legend(fontsize=8)
    if with_val:
        val_ax = axes[0][1]
        for i, r in enumerate(runs):
            if r["val_accuracy"]:
                steps, values = zip(*r["val_accuracy"])
                val_ax.plot(steps, [100 * v for v in values], label=r["run"], color=colors(i % 10), marker="o",
                            markersize=3, linewidth=1.2)
        val_ax.set_xlabel("step")
        val_ax.set_ylabel("validation accuracy (%)")
        val_ax.set_ylim(0, 100)
        val_ax.set_title("validation accuracy", fontsize=10)
        val_ax.legend(fontsize=8)
    return _save(fig, path)


def _distinct_names(paths: list[Path]) -> list[str]:
    """The shortest trailing parts of each path that tell the runs apart: seed0, seed1; or trec/seed0, sst2/seed0."""
    for depth in range(1, max(len(p.parts) for p in paths) + 1):
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]  # the same folder twice: say so plainly


def write_curves(run_dirs: list[str | Path], out: str | Path) -> list[Path]:
    """The curves PNG at `out` and its data at `out` with .json ({"runs": [load_curves(...), ...]})."""
    runs = [load_curves(d) for d in run_dirs]
    for r, name in zip(runs, _distinct_names([Path(d).resolve() for d in run_dirs])):
        r["run"] = name
    png = curves_chart(runs, out)
    data = png.with_suffix(".json")
    data.write_text(json.dumps({"runs": runs}, indent=1) + "\n", encoding="utf-8")
    return [png, data]


# `telepathy report`: the arguments are in telepathy.commands (torch-free, for a fast `--help`).


def report_command(args: argparse.Namespace) -> int:
    if args.curves:
        try:
            written = write_curves(args.curves, args.out or "curves.png")
        except (CurvesError, OSError) as exc:
            return fail("report", str(exc))
        for path in written:
            print(path)
        return 0
    try:
        tasks = [resolve_task(t).spec for t in args.task or []]
        written = write_report(args.results, args.out or args.results, tasks)
    except (FileNotFoundError, UnknownTaskError, ValueError) as exc:  # ValueError: TaskFileError, labels unknown
        return fail("report", str(exc))
    for path in written:
        print(path)
    return 0
