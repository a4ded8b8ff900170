"""`telepathy bench`: latency benchmark client for a running gateway.

For each path in turn (never both at once: they would compete for the same CPU/GPU), `warmup` requests that are
not counted, then `requests` measured ones with `concurrency` in flight, texts taken in order from the task's test
split (cycled when there are fewer). The task is a built-in task's name or the path of a task file; the gateway is
asked for it by name. Client-side wall time per request; the gateway's own stage breakdown
(sender / wire / receiver) is averaged alongside. Output: a JSON report and, optionally, a latency CDF plot.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from telepathy.bridge.tasks import BUILTIN_TASKS, Task, resolve_task

PATHS = ("bridge", "text")


@dataclass
class BenchConfig:
    url: str = "http://127.0.0.1:8000"
    task: str = ""  # a built-in task's name or a task file's path; "": the first built-in task
    requests: int = 100  # measured requests per path
    concurrency: int = 1  # requests in flight; 1 = batch-1 latency
    paths: tuple[str, ...] = PATHS
    texts_file: str = ""  # "" = the task's test split; else JSONL with "text" (+ optional "label") or plain lines
    warmup: int = 5  # per path, excluded from the figures
    timeout_s: float = 60.0  # per HTTP request
    api_key: str = ""
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.paths, str):
            self.paths = tuple(p.strip() for p in self.paths.split(",") if p.strip())
        self.paths = tuple(self.paths)
        bad = [p for p in self.paths if p not in PATHS]
        if bad or not self.paths:
            raise ValueError(f"paths must be a non-empty subset of {PATHS}, got {self.paths}")
        if self.requests < 1 or self.concurrency < 1 or self.warmup < 0:
            raise ValueError("requests and concurrency must be >= 1, warmup >= 0")
        # UnknownTaskError / TaskFileError before any request is made
        self.loaded_task: Task = resolve_task(self.task or next(iter(BUILTIN_TASKS)))
        self.task = self.loaded_task.reference
        self.url = self.url.rstrip("/")


@dataclass
class Sample:
    ok: bool
    status: int  # HTTP status; 0 = transport error (connection refused, client timeout)
    latency_ms: float
    timings_ms: dict[str, float] = field(default_factory=dict)
    wire_bytes: int = 0
    correct: bool | None = None
    error: str = ""


def load_texts(task: Task | str, texts_file: str = "", limit: int | None = None) -> list[tuple[str, int | None]]:
    """(text, label or None) pairs: the task's test split by default, or a JSONL / plain-text file."""
    if not texts_file:
        from telepathy.bridge.training.data import load_split
        return [(ex.text, ex.label) for ex in load_split(task, "test", limit=limit)]
    rows: list[tuple[str, int | None]] = []
    with open(texts_file, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                row = json.loads(line)
                rows.append((row["text"], int(row["label"]) if "label" in row else None))
            else:
                rows.append((line, None))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{texts_file}: no texts")
    return rows


def _shown(path: Path) -> str:
    """`path` relative to the working folder when it lies inside it (reports stay free of home folders)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def percentiles(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {k: None for k in ("p50", "p95", "p99", "mean", "min", "max", "std")}
    a = np.asarray(latencies, dtype=np.float64)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
            "mean": round(float(a.mean()), 3), "min": round(float(a.min()), 3), "max": round(float(a.max()), 3),
            "std": round(float(a.std()), 3)}


def summarize(samples: list[Sample], wall_s: float) -> dict[str, Any]:
    good = [s for s in samples if s.ok]
    errors: dict[str, int] = {}
    for s in samples:
        if not s.ok:
            errors[str(s.status)] = errors.get(str(s.status), 0) + 1
    stages = {}
    for stage in ("sender", "wire", "receiver", "total"):
        vals = [s.timings_ms[stage] for s in good if stage in s.timings_ms]
        stages[stage] = round(float(np.mean(vals)), 3) if vals else None
    judged = [s.correct for s in good if s.correct is not None]
    return {
        "requests": len(samples),
        "ok": len(good),
        "errors": len(samples) - len(good),
        "errors_by_status": errors,
        "first_error": next((s.error for s in samples if not s.ok), None),
        "latency_ms": percentiles([s.latency_ms for s in good]),
        "throughput_rps": round(len(good) / wall_s, 3) if wall_s > 0 else None,
        "wall_s": round(wall_s, 3),
        "server_timings_ms_mean": stages,
        "wire_bytes_mean": round(float(np.mean([s.wire_bytes for s in good])), 1) if good else None,
        "accuracy": round(sum(judged) / len(judged), 4) if judged else None,
    }


async def _one(client: httpx.AsyncClient, task: str, path: str, text: str, label: int | None,
               labels: tuple[str, ...]) -> Sample:
    start = time.perf_counter()
    try:
        r = await client.post("/v1/classify", json={"task": task, "text": text, "path": path})
    except httpx.HTTPError as exc:
        return Sample(False, 0, (time.perf_counter() - start) * 1000.0, error=f"{type(exc).__name__}: {exc}")
    latency = (time.perf_counter() - start) * 1000.0
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:200]
        return Sample(False, r.status_code, latency, error=f"HTTP {r.status_code}: {message}")
    body = r.json()
    correct = None if label is None else body["label"] == labels[label]
    return Sample(True, 200, latency, body.get("timings_ms", {}), int(body.get("wire_bytes", 0)), correct)


async def _drive(client: httpx.AsyncClient, cfg: BenchConfig, path: str, items: list[tuple[str, int | None]],
                 bar: tqdm | None) -> tuple[list[Sample], float]:
    labels = cfg.loaded_task.spec.labels
    samples: list[Sample | None] = [None] * len(items)
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(items):
            i = next_index
            next_index += 1  # no await between read and increment: race-free on one event loop
            text, label = items[i]
            samples[i] = await _one(client, cfg.loaded_task.name, path, text, label, labels)
            if bar is not None:
                bar.update(1)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, len(items)))))
    return [s for s in samples if s is not None], time.perf_counter() - start


async def run_bench_async(cfg: BenchConfig) -> dict[str, Any]:
    pool = load_texts(cfg.loaded_task, cfg.texts_file)
    # Warm-up takes its texts from the end of the pool so measured requests start at the first test row.
    measured = [pool[i % len(pool)] for i in range(cfg.requests)]
    warm = [pool[-1 - (i % len(pool))] for i in range(cfg.warmup)]
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    report: dict[str, Any] = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k != "api_key"},
        "texts": cfg.texts_file or _shown(cfg.loaded_task.data_file("test")),
        "texts_available": len(pool),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "client": _client_machine(),
        "paths": {},
    }
    async with httpx.AsyncClient(base_url=cfg.url, timeout=cfg.timeout_s, limits=limits, headers=headers) as client:
        try:
            ready = await client.get("/readyz")
        except httpx.HTTPError as exc:
            raise RuntimeError(f"no gateway at {cfg.url}: {type(exc).__name__}: {exc}") from None
        if ready.status_code != 200:
            raise RuntimeError(f"{cfg.url}/readyz answered {ready.status_code}: {ready.text[:300]}")
        info = await client.get("/v1/info")
        report["server"] = info.json() if info.status_code == 200 else {"error": info.text[:300]}
        raw: dict[str, list[float]] = {}
        for path in cfg.paths:
            if warm:
                await _drive(client, cfg, path, warm, None)
            bar = tqdm(total=len(measured), desc=f"{path:>6}", unit="req", disable=not cfg.progress, leave=True)
            samples, wall = await _drive(client, cfg, path, measured, bar)
            bar.close()
            report["paths"][path] = summarize(samples, wall)
            raw[path] = [round(s.latency_ms, 3) for s in samples if s.ok]
    report["speedup"] = _speedup(report["paths"])
    report["latencies_ms"] = raw  # for the plot, and for anyone who wants other statistics later
    return report


def _speedup(paths: dict[str, dict[str, Any]]) -> dict[str, float | None] | None:
    """How many times faster the bridge path is than the text path (> 1: bridge faster)."""
    if "bridge" not in paths or "text" not in paths:
        return None
    b, t = paths["bridge"], paths["text"]
    out: dict[str, float | None] = {}
    for k in ("p50", "p95", "p99", "mean"):
        bv, tv = b["latency_ms"][k], t["latency_ms"][k]
        out[k] = round(tv / bv, 3) if bv and tv else None
    bt, tt = b["throughput_rps"], t["throughput_rps"]
    out["throughput"] = round(bt / tt, 3) if bt and tt else None
    return out


def _client_machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu, "cpu_count": os.cpu_count()}


def plot_cdf(report: dict[str, Any], out_png: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    colors = {"bridge": "tab:blue", "text": "tab:orange"}
    for path, lat in report["latencies_ms"].items():
        if not lat:
            continue
        xs = np.sort(np.asarray(lat))
        ys = np.arange(1, len(xs) + 1) / len(xs)
        summary = report["paths"][path]
        p = summary["latency_ms"]
        label = f"{path}: p50 {p['p50']:.1f} ms, p99 {p['p99']:.1f} ms"
        if summary["errors"]:
            label += f" ({summary['errors']} errors not shown)"
        ax.step(xs, ys, where="post", color=colors.get(path), label=label)
        ax.axvline(p["p50"], color=colors.get(path), linestyle=":", linewidth=1)
    cfg = report["config"]
    title = f"{cfg['task']}: latency CDF, {cfg['requests']} req/path, concurrency {cfg['concurrency']}"
    if report.get("speedup") and report["speedup"].get("p50"):
        title += f"; bridge {report['speedup']['p50']:.2f}× faster at p50"
    ax.set_title(title, fontsize=9)
    ax.set_xscale("log")
    # Plain numbers on the log axis ("200", not "2×10^2"); minor ticks labelled at 2× and 5× only, so the
    # labels stay readable whether the two paths are 2× or 100× apart.
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(base=10, subs=(2.0, 5.0)))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("end-to-end latency at the client (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'path':<7} {'ok':>5} {'err':>4} {'p50':>9} {'p95':>9} {'p99':>9} {'mean':>9} {'req/s':>8} "
             f"{'wire B':>8} {'acc':>6}"]
    for path, s in report["paths"].items():
        lat = s["latency_ms"]

        def f(v: float | None, spec: str = "9.1f") -> str:
            return format(v, spec) if v is not None else f"{'-':>{spec.split('.')[0]}}"
        lines.append(f"{path:<7} {s['ok']:>5} {s['errors']:>4} {f(lat['p50'])} {f(lat['p95'])} {f(lat['p99'])} "
                     f"{f(lat['mean'])} {f(s['throughput_rps'], '8.2f')} {f(s['wire_bytes_mean'], '8.0f')} "
                     f"{f(s['accuracy'], '6.3f')}")
        if s["first_error"]:
            lines.append(f"        first error: {s['first_error']}")
    sp = report.get("speedup")
    if sp:
        lines.append(f"bridge vs text speed-up: p50 {sp['p50']}×, p95 {sp['p95']}×, mean {sp['mean']}×, "
                     f"throughput {sp['throughput']}×")
    lines.append("latencies in ms, measured at the client")
    return "\n".join(lines)


def run_bench(cfg: BenchConfig, out_json: str | Path, out_png: str | Path | None = None) -> dict[str, Any]:
    report = asyncio.run(run_bench_async(cfg))
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if out_png:
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        plot_cdf(report, out_png)
    return report
