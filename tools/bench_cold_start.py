"""Cold start of `telepathy up`: launch → ready, what each phase takes, and whether the first requests after
/readyz turns 200 are slower than repeats of them.

    python tools/bench_cold_start.py                          # the embedded pair on this machine's default device
    python tools/bench_cold_start.py --fresh-cache            # a first run: the embedded GGUF files are converted
    python tools/bench_cold_start.py --pair --out results/cold_start_pair.json
    python tools/bench_cold_start.py --sender-model random:tiny-llama --receiver-model random:tiny-gemma

It runs `telepathy up` as a user would, timestamps every line it prints (the services' "loaded … in", "warm-up
took", "serving on", and up's own "waiting: …" lines, which quote /readyz), then, for every task with a bridge,
sends each request kind (bridge / text path × a short and a 3,990-character text) once and `--repeats` times more.
With --warmup-cost it then loads both models in this process and times the warm-up the services run (one row per
batch on the eager path) against the max-batch warm-up (32 rows, what the services ran before), side by side.
Prints a summary and writes JSON. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

SHORT = "a gripping, beautifully acted film"
LONG = ("The committee met again on Tuesday to review the budget, line by line, and the members argued about "
        "every item. ") * 35  # 3,990 characters, just under the default max_text_chars of 4,000
EVENTS = {  # what the services print at each step of start-up
    "loaded": re.compile(r"loaded (\S+) on (\S+) \((\S+)\) in ([\d.]+)s"),
    "warm_up": re.compile(r"(\w+) warm-up took ([\d.]+)s"),
    "serving": re.compile(r"(\w+) serving on "),
    "waiting": re.compile(r"waiting: (.*)$"),
}


class Lines:
    """Every line a child prints, with the seconds since launch it arrived at."""

    def __init__(self, proc: subprocess.Popen, started: float, echo: bool):
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, args=(proc, started, echo), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen, started: float, echo: bool) -> None:
        for line in proc.stdout:
            self.lines.append((round(time.monotonic() - started, 2), line.rstrip("\n")))
            if echo:
                print(line, end="", flush=True)

    def events(self) -> list[dict]:
        found = []
        for t, line in self.lines:
            for kind, pattern in EVENTS.items():
                m = pattern.search(line)
                if m:
                    found.append({"t_s": t, "event": kind, "source": line.split("|", 1)[0].strip(),
                                  "match": list(m.groups())})
        return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> float:
    started = time.monotonic()
    with httpx.Client(timeout=3.0) as client:
        while time.monotonic() - started < timeout_s:
            if proc.poll() is not None:
                raise SystemExit(f"telepathy up exited with {proc.returncode} before it was ready; run it with "
                                 "--echo to see why")
            try:
                if client.get(f"{url}/readyz").status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise SystemExit(f"not ready after {timeout_s:.0f} s")


def time_requests(url: str, repeats: int) -> list[dict]:
    """Each request kind once right after ready (first), then `repeats` more; client-side milliseconds."""
    rows = []
    with httpx.Client(base_url=url, timeout=300.0) as client:
        tasks = [t["name"] for t in client.get("/v1/tasks").json()["tasks"] if t["bridge"]]
        for task in tasks:
            for path in ("bridge", "text"):
                for length, text in (("short", SHORT), ("long", LONG)):
                    ms = []
                    for _ in range(1 + repeats):
                        started = time.perf_counter()
                        r = client.post("/v1/classify", json={"task": task, "text": text, "path": path})
                        ms.append(round((time.perf_counter() - started) * 1000, 1))
                        if r.status_code != 200:
                            raise SystemExit(f"{task} {path} {length}: {r.status_code} {r.text}")
                    repeat = sorted(ms[1:])[len(ms[1:]) // 2] if repeats else None
                    rows.append({"task": task, "path": path, "length": length, "chars": len(text),
                                 "first_ms": ms[0], "repeat_median_ms": repeat, "all_ms": ms,
                                 "first_over_repeat": round(ms[0] / repeat, 2) if repeat else None})
    return rows


def warmup_cost(args) -> dict:
    """The services' warm-up (one row per batch, eager) against a max-batch one (32 rows), in this process."""
    from telepathy.bridge.lm import LanguageModel
    from telepathy.bridge.runtime.engine import load_bridge_set
    from telepathy.bridge.runtime.factory import build_receiver_runtime, build_sender_runtime
    from telepathy.config import SHIPPED_BRIDGES
    from telepathy.serving.lifecycle import resolve_device

    device = resolve_device(args.device or "auto")
    bridges = args.bridges or str(SHIPPED_BRIDGES)
    out = {}
    for half, spec in (("sender", args.sender_model), ("receiver", args.receiver_model)):
        lm = LanguageModel.load(spec, device=device)
        bridge_set = load_bridge_set(bridges, lm, half, lm.device)
        if half == "sender":
            runtime = build_sender_runtime(lm, bridge_set)
            warm = lambda rows=None, r=runtime: r.warmup(32, "int8", rows)  # noqa: E731
        else:
            runtime = build_receiver_runtime(lm, bridge_set)
            warm = lambda rows=None, r=runtime: r.warmup(32, rows)  # noqa: E731
        started = time.perf_counter()
        warm()  # what the services run (first in the process: it pays the lazy set-up)
        services_s = time.perf_counter() - started
        started = time.perf_counter()
        warm(32)  # max-size batches, after the set-up is paid: a lower bound of what they cost before
        max_batch_s = time.perf_counter() - started
        eager_rows = not runtime.fast
        out[half] = {"model": lm.spec, "device": str(lm.device), "bridges": len(bridge_set.by_id),
                     "fast_path": not eager_rows, "warmup_s": round(services_s, 2),
                     "max_batch_warmup_s": round(max_batch_s, 2)}
        del runtime, lm
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0, help="gateway port (default: a free one)")
    p.add_argument("--sender-port", type=int, default=0)
    p.add_argument("--receiver-port", type=int, default=0)
    p.add_argument("--sender-model", default="smollm2-135m-instruct")
    p.add_argument("--receiver-model", default="gemma-3-270m")
    p.add_argument("--bridges", default="", help="bridge folder (default: the shipped bridges)")
    p.add_argument("--device", default="", help="cpu, cuda, … (default: each service's default)")
    p.add_argument("--pair", action="store_true", help="one pair process instead of two services")
    p.add_argument("--fresh-cache", action="store_true",
                   help="an empty TELEPATHY_CACHE_DIR: measure a first run, conversion included")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup-cost", action="store_true", help="also time the warm-up itself in this process")
    p.add_argument("--timeout-s", type=float, default=900.0)
    p.add_argument("--echo", action="store_true", help="print telepathy up's output as it comes")
    p.add_argument("--out", default="results/cold_start.json")
    args = p.parse_args(argv)

    args.port, args.sender_port, args.receiver_port = (n or free_port() for n in
                                                       (args.port, args.sender_port, args.receiver_port))
    env = dict(os.environ)
    cache = None
    if args.fresh_cache:
        cache = tempfile.TemporaryDirectory(prefix="telepathy-cold-")
        env["TELEPATHY_CACHE_DIR"] = cache.name
    cmd = [sys.executable, "-m", "telepathy", "up", "--port", str(args.port), "--sender-port", str(args.sender_port),
           "--receiver-port", str(args.receiver_port), "--sender-model", args.sender_model,
           "--receiver-model", args.receiver_model]
    cmd += ["--bridges", args.bridges] if args.bridges else []
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--pair"] if args.pair else []
    url = f"http://127.0.0.1:{args.port}"
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = Lines(proc, started, args.echo)
    try:
        ready_s = wait_ready(url, proc, args.timeout_s)
        requests = time_requests(url, args.repeats)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        if cache is not None:
            cache.cleanup()
    result = {
        "command": " ".join(["python", "tools/bench_cold_start.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "up_command": " ".join(cmd[2:]), "fresh_cache": args.fresh_cache,
        # `telepathy up` sets OMP_WAIT_POLICY=PASSIVE unless it is set; "" here runs the OpenMP default
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "ready_s": round(ready_s, 1), "events": lines.events(), "requests": requests,
    }
    if args.warmup_cost:
        result["warmup_cost"] = warmup_cost(args)
    print(f"ready after {ready_s:.1f} s ({'first run' if args.fresh_cache else 'converted models cached'})")
    for e in result["events"]:
        print(f"  {e['t_s']:7.1f} s  {e['source']:<8} {e['event']:<8} {' '.join(e['match'])}")
    print(f"{'task':<8} {'path':<6} {'length':<6} {'first ms':>9} {'repeat ms':>10} {'first/repeat':>12}")
    for r in requests:
        print(f"{r['task']:<8} {r['path']:<6} {r['length']:<6} {r['first_ms']:>9.1f} {r['repeat_median_ms'] or 0:>10.1f} "
              f"{r['first_over_repeat'] or 0:>12.2f}")
    for half, w in result.get("warmup_cost", {}).items():
        print(f"warm-up {half}: {w['warmup_s']} s as the services run it, {w['max_batch_warmup_s']} s with 32 rows")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
