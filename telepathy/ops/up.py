"""`telepathy up`: receiver, sender and gateway as three local processes on loopback, until Ctrl-C / SIGTERM.

    receiver  telepathy serve receiver --model R --bridges B --port 50052
    sender    telepathy serve sender   --model S --bridges B --port 50051 --receiver-addr 127.0.0.1:50052
    gateway   telepathy gateway        --port 8000 --sender-addr 127.0.0.1:50051 --receiver-addr 127.0.0.1:50052

With --pair, one `telepathy serve pair` (both models, the Sender and Receiver services on --sender-port) replaces
the receiver and the sender, and the gateway reaches both services at that one address.

Each child runs in its own process group (so a terminal Ctrl-C reaches only this launcher, which then stops the
children in order: gateway first so no new work arrives, then sender, then receiver), with PR_SET_PDEATHSIG on
Linux (so even a SIGKILLed launcher leaves no orphans). Their output is streamed with a name prefix.
A fresh random service token is shared by the three through the environment (not argv: `ps` would show it),
so nothing else on the machine can call the services, unless TELEPATHY_AUTH_TOKEN is already set. So that the
user's own gRPC clients can call them, that generated token is also written, mode 0600, to
telepathy.client.up_token_path(port) for each gRPC port (the banner names the file, never the token) and removed
on stop; the agent SDK reads it by itself when it dials a loopback address with no token configured.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from telepathy.bridge.tasks import BUILTIN_TASKS
from telepathy.client import up_token_path
from telepathy.config import SHIPPED_BRIDGES

# torch-free sources of the same constants as telepathy.bridge.models: the launcher never loads a model.
from telepathy.receiver_service.settings import DEFAULT_RECEIVER
from telepathy.sender_service.settings import DEFAULT_SENDER

LOOPBACK = "127.0.0.1"


@dataclass
class UpConfig:
    port: int = 8000  # gateway HTTP port
    sender_model: str = DEFAULT_SENDER  # the embedded pair by default: SmolLM2-135M-Instruct → Gemma-3-270m
    receiver_model: str = DEFAULT_RECEIVER
    bridges: str = str(SHIPPED_BRIDGES)  # bridges shipped in the package (tasks without one: bridge path → 404)
    sender_port: int = 50051
    receiver_port: int = 50052
    device: str = ""  # "" = each service's default (CUDA when available)
    startup_timeout_s: float = 900.0  # first start converts the embedded GGUF files: minutes, not seconds
    stop_timeout_s: float = 15.0  # per process, SIGTERM → SIGKILL
    access_log: bool = False  # per-request gateway log lines (off: a bench run would flood the console)
    pair: bool = False  # one `telepathy serve pair` on sender_port instead of two services (one GPU)

    def __post_init__(self) -> None:
        ports = self.ports
        if len(set(ports)) != len(ports) or any(not 0 < p < 65536 for p in ports):
            raise ValueError(f"ports must be {len(ports)} distinct values in 1..65535, got {ports}")
        if self.startup_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise ValueError("timeouts must be > 0")

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ports(self) -> list[int]:
        """The ports this configuration listens on (the pair has no receiver port of its own)."""
        return [self.port, self.sender_port] + ([] if self.pair else [self.receiver_port])

    @property
    def grpc_ports(self) -> list[int]:
        return [self.sender_port] + ([] if self.pair else [self.receiver_port])


class _Console:
    """Line-atomic output shared by the launcher and the log-pump threads."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.lock = threading.Lock()
        self.width = len("receiver")

    def line(self, name: str, text: str) -> None:
        with self.lock:
            self.stream.write(f"{name:<{self.width}} | {text}\n")
            self.stream.flush()


def _set_pdeathsig() -> None:
    # Runs in the child between fork and exec: ask the kernel to SIGTERM it when the launcher dies, however it dies.
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:  # noqa: BLE001 - not Linux / no glibc: the child then outlives a killed launcher, as before
        pass


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


class Launcher:
    def __init__(self, config: UpConfig, out: IO[str] | None = None):
        self.config = config
        self.console = _Console(out or sys.stdout)
        self.procs: dict[str, subprocess.Popen] = {}
        self.pumps: list[threading.Thread] = []
        self.stop_requested = threading.Event()
        self.stop_signal: int | None = None
        self.generated_token = ""  # set when this launcher made the token (not when TELEPATHY_AUTH_TOKEN was set)
        self.token_files: list[Path] = []  # the up_token_path files written, removed on stop

    # -- commands ----------------------------------------------------------------------------------------------
    def commands(self) -> dict[str, list[str]]:
        c = self.config
        cli = [sys.executable, "-m", "telepathy.cli"]
        receiver_addr = f"{LOOPBACK}:{c.receiver_port}"
        sender_addr = f"{LOOPBACK}:{c.sender_port}"
        device = ["--device", c.device] if c.device else []
        gateway = cli + ["gateway", "--host", LOOPBACK, "--port", str(c.port), "--sender-addr", sender_addr,
                         "--receiver-addr", sender_addr if c.pair else receiver_addr] + ([] if c.access_log else ["--no-access-log"])
        if c.pair:
            return {
                "pair": cli + ["serve", "pair", "--model", c.sender_model, "--receiver-model", c.receiver_model,
                               "--bridges", c.bridges, "--host", LOOPBACK, "--port", str(c.sender_port)] + device,
                "gateway": gateway,
            }
        return {
            "receiver": cli + ["serve", "receiver", "--model", c.receiver_model, "--bridges", c.bridges,
                               "--host", LOOPBACK, "--port", str(c.receiver_port)] + device,
            "sender": cli + ["serve", "sender", "--model", c.sender_model, "--bridges", c.bridges,
                             "--host", LOOPBACK, "--port", str(c.sender_port), "--receiver-addr", receiver_addr] + device,
            "gateway": gateway,
        }

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if not env.get("TELEPATHY_AUTH_TOKEN"):
            self.generated_token = self.generated_token or secrets.token_urlsafe(24)
            env["TELEPATHY_AUTH_TOKEN"] = self.generated_token
        env["PYTHONUNBUFFERED"] = "1"  # log lines as they happen, not when a 4 KB buffer fills
        # Flags set every address explicitly; drop listen settings inherited from the shell so they cannot clash
        # (a TELEPATHY_METRICS_PORT meant for one service would make the second one fail to bind).
        for var in ("TELEPATHY_HOST", "TELEPATHY_PORT", "TELEPATHY_GATEWAY_HOST", "TELEPATHY_GATEWAY_PORT",
                    "TELEPATHY_METRICS_PORT"):
            env.pop(var, None)
        return env

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def run(self) -> int:
        """Start, wait until ready, serve until a signal or a child's death, stop. Returns the exit code."""
        busy = [p for p in self.config.ports if not _port_free(p)]
        if busy:
            self.say(f"port(s) {busy} already in use on {LOOPBACK} (another `telepathy up`?); choose others with "
                     "--port / --sender-port / --receiver-port")
            return 2
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            code = self.wait_ready()
            if code is None:
                self.banner()
                code = self.serve()
            return code
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum: int, frame) -> None:
        self.stop_signal = signum
        self.stop_requested.set()

    def say(self, text: str) -> None:
        self.console.line("up", text)

    def start(self) -> None:
        env = self.environment()
        cmds = self.commands()
        if self.generated_token:
            self._write_token_files()
        # All are forked before any pump thread exists: preexec_fn is only safe in a single-threaded parent.
        for name in cmds:
            self.procs[name] = subprocess.Popen(
                cmds[name], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, preexec_fn=_set_pdeathsig if sys.platform == "linux" else None,
                text=True, encoding="utf-8", errors="replace", bufsize=1,
            )
        for name, proc in self.procs.items():
            self.say(f"started {name} (pid {proc.pid}): {shlex.join(cmds[name][1:])}")
            pump = threading.Thread(target=self._pump, args=(name, proc), name=f"log-{name}", daemon=True)
            pump.start()
            self.pumps.append(pump)

    def _write_token_files(self) -> None:
        for port in self.config.grpc_ports:
            path = up_token_path(port)
            try:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                # Created 0600 (never readable by others, not even for a moment), then moved over any stale file.
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
                with os.fdopen(fd, "w", encoding="ascii") as f:
                    os.fchmod(f.fileno(), 0o600)  # the umask can only take bits away; this also undoes an odd one
                    f.write(self.generated_token + "\n")
                os.replace(tmp, path)
            except OSError as exc:  # only local clients lose out; the services themselves are unaffected
                self.say(f"could not write the service token file {path} ({exc}); gRPC clients need "
                         "TELEPATHY_AUTH_TOKEN")
                continue
            self.token_files.append(path)

    def _remove_token_files(self) -> None:
        for path in self.token_files:
            try:
                # A later `telepathy up` on the same port may already have replaced it: leave its token alone.
                if path.read_text(encoding="ascii").strip() == self.generated_token:
                    path.unlink()
            except OSError:
                pass
        self.token_files.clear()

    def _pump(self, name: str, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.console.line(name, line.rstrip("\n"))

    def _dead(self) -> str | None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                return name
        return None

    def wait_ready(self) -> int | None:
        """None once /readyz says 200; else the exit code to leave with. Says what start-up waits for (the
        services' own words, from /readyz) when that changes, and again every 15 s while it does not."""
        deadline = time.monotonic() + self.config.startup_timeout_s
        said, said_at = "", time.monotonic()
        with httpx.Client(timeout=3.0) as client:
            while not self.stop_requested.is_set():
                dead = self._dead()
                if dead:
                    self.say(f"{dead} exited ({_describe_exit(self.procs[dead].returncode)}) during start-up; stopping")
                    return 1
                doing = "the gateway is starting"
                try:
                    r = client.get(f"{self.config.url}/readyz")
                    if r.status_code == 200:
                        return None
                    doing = _waiting_for(r) or doing
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self.say(f"not ready after {self.config.startup_timeout_s:.0f} s ({doing}); stopping")
                    return 1
                if doing != said or time.monotonic() - said_at > 15:
                    self.say(f"waiting: {doing}")
                    said, said_at = doing, time.monotonic()
                self.stop_requested.wait(0.5)
        return 0  # stopped by a signal before ready: a clean, requested stop

    def banner(self) -> None:
        url = self.config.url
        # The example asks for the first task the gateway serves with a bridge, else its first task (text path).
        task, path = next(iter(BUILTIN_TASKS)), "text"
        try:
            tasks = httpx.get(f"{url}/v1/tasks", timeout=3.0,
                              headers=_auth_header(os.environ.get("TELEPATHY_API_KEYS", ""))).json()["tasks"]
            with_bridge = [t["name"] for t in tasks if t.get("bridge")]
            if with_bridge:
                task, path = with_bridge[0], "bridge"
            elif tasks:
                task = tasks[0]["name"]
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        text = "The new phone went on sale today, and the first reviews are glowing."
        body = json.dumps({"task": task, "text": text, "path": path})
        key = ' -H "Authorization: Bearer $TELEPATHY_API_KEY"' if os.environ.get("TELEPATHY_API_KEYS") else ""
        self.say(f"Telepathy is up: {url}  (API docs: {url}/docs)")
        receiver_port = self.config.sender_port if self.config.pair else self.config.receiver_port
        self.say(f"  sender   {self.config.sender_model} on grpc {LOOPBACK}:{self.config.sender_port}")
        self.say(f"  receiver {self.config.receiver_model} on grpc {LOOPBACK}:{receiver_port}"
                 + ("  (one pair process: the bridge path is one model call)" if self.config.pair else ""))
        if path == "text":
            self.say(f"  no bridge for any task under {self.config.bridges}: the bridge path answers 404; "
                     "the text path works")
        if self.token_files:
            self.say(f"  gRPC service token in {', '.join(map(str, self.token_files))} (readable by you only; "
                     "telepathy.client uses it on loopback by itself)")
        elif not self.generated_token:
            self.say("  gRPC service token: the TELEPATHY_AUTH_TOKEN you set")
        self.say("Try:")
        self.say(f"  curl -s {url}/v1/classify -H 'Content-Type: application/json'{key} -d '{body}'")
        self.say(f"  curl -s {url}/v1/compare -H 'Content-Type: application/json'{key} "
                 f"-d '{json.dumps({'task': task, 'text': text})}'")
        self.say("Press Ctrl-C to stop.")

    def serve(self) -> int:
        while not self.stop_requested.wait(0.5):
            dead = self._dead()
            if dead:
                self.say(f"{dead} exited ({_describe_exit(self.procs[dead].returncode)}); stopping the others")
                return 1
        self.say(f"{signal.Signals(self.stop_signal).name if self.stop_signal else 'stop'} received; stopping")
        return 0

    def stop(self) -> None:
        """Gateway first (no new work), then sender (or pair), then receiver; SIGTERM, then SIGKILL after the
        timeout. Finally SIGKILL each whole process group, so helpers a service may have spawned go too."""
        for name in ("gateway", "pair", "sender", "receiver"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(self.config.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.say(f"{name} did not stop within {self.config.stop_timeout_s:.0f} s; killing it")
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGKILL)
        for pump in self.pumps:
            pump.join(timeout=2.0)
        for name, proc in self.procs.items():
            self.say(f"{name} stopped ({_describe_exit(proc.returncode)})")
        self.procs.clear()
        self._remove_token_files()


def _waiting_for(r: httpx.Response) -> str:
    """What a 503 from /readyz says the services are doing ("sender is warming up (…)"), else ""."""
    try:
        body = r.json()
    except ValueError:
        return ""
    waiting = body.get("waiting") or {}
    if waiting:
        return "; ".join(f"{name} is {what}" for name, what in waiting.items())
    services = body.get("services") or {}
    return ", ".join(f"{k} {v}" for k, v in services.items())


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly, so -15 is a normal stop for it.
        return f"by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session=True: the child's pid is its process group id
    except (ProcessLookupError, PermissionError):
        pass


def _auth_header(api_keys: str) -> dict[str, str]:
    key = next((k.strip() for k in api_keys.split(",") if k.strip()), "")
    return {"Authorization": f"Bearer {key}"} if key else {}


def up(config: UpConfig) -> int:
    return Launcher(config).run()

