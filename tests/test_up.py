"""`telepathy up` as a user runs it: a real process tree (launcher → receiver, sender, gateway), tiny random pair.

It must get ready, answer on both paths, prefix the services' logs, and on SIGINT (Ctrl-C) / SIGTERM stop all
three cleanly; even a SIGKILLed launcher must leave no orphans behind (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

READY_LINE = "Press Ctrl-C to stop."


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie has exited; only its exit status is left
    except (FileNotFoundError, ProcessLookupError):
        return False


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Up:
    """`telepathy up` in its own session (as from a terminal), its output collected line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "telepathy.cli", "up", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"no {text!r} in the output of `telepathy up`:\n" + "\n".join(self.lines[-60:]))
            time.sleep(0.1)

    def child_pids(self) -> dict[str, int]:
        found = (re.match(r"up +\| started (\w+) \(pid (\d+)\)", line) for line in self.lines)
        return {m.group(1): int(m.group(2)) for m in found if m}

    def kill_all(self) -> None:  # test clean-up only, in case an assertion failed half-way
        for pid in [self.proc.pid, *self.child_pids().values()]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.mark.parametrize("sig, pair", [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGKILL, False),
                                       (signal.SIGTERM, True)], ids=["SIGINT", "SIGTERM", "SIGKILL", "pair-SIGTERM"])
def test_up_serves_then_stops_cleanly(tiny_bridges_dir, tmp_path, sig, pair):
    port, sender_port, receiver_port = _free_ports(3)
    env = {k: v for k, v in os.environ.items() if k != "TELEPATHY_AUTH_TOKEN"} | {"XDG_RUNTIME_DIR": str(tmp_path)}
    up = Up("--port", str(port), "--sender-port", str(sender_port), "--receiver-port", str(receiver_port),
            "--sender-model", "random:tiny-llama", "--receiver-model", "random:tiny-gemma",
            "--bridges", str(tiny_bridges_dir), "--startup-timeout-s", "120", *(["--pair"] if pair else []), env=env)
    services = ("pair", "gateway") if pair else ("receiver", "sender", "gateway")
    token_files = [tmp_path / "telepathy" / f"up-{p}.token" for p in ([sender_port] if pair else [sender_port, receiver_port])]
    try:
        up.wait_for(READY_LINE, timeout=150)
        out = "\n".join(up.lines)
        # The generated token, for local gRPC clients: one 0600 file per gRPC port, named in the banner, never shown.
        assert sorted((tmp_path / "telepathy").iterdir()) == sorted(token_files)
        tokens = {f.read_text().strip() for f in token_files}
        assert len(tokens) == 1 and len(next(iter(tokens))) >= 32
        assert all(f.stat().st_mode & 0o777 == 0o600 for f in token_files)
        assert f"gRPC service token in {', '.join(map(str, token_files))}" in out
        assert next(iter(tokens)) not in out
        assert f"Telepathy is up: http://127.0.0.1:{port}" in out
        assert f"curl -s http://127.0.0.1:{port}/v1/classify" in out  # an example to copy
        for name in services:  # the services' own logs, prefixed
            assert re.search(rf"^{name} +\| .+", out, re.M), name
        pids = up.child_pids()
        assert set(pids) == set(services)

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as c:
            assert c.get("/readyz").status_code == 200
            for path in ("bridge", "text"):
                r = c.post("/v1/classify", json={"text": "a gripping , beautifully acted film", "task": "sst2",
                                                 "path": path})
                assert r.status_code == 200, r.text
                if pair and path == "bridge":  # one fused model call: no stream hop, no receiver stage
                    assert r.json()["timings_ms"]["wire"] == 0 and r.json()["timings_ms"]["receiver"] == 0, r.json()

        up.proc.send_signal(sig)
        rc = up.proc.wait(timeout=60)
        if sig == signal.SIGKILL:
            assert rc == -signal.SIGKILL
        else:
            assert rc == 0, "\n".join(up.lines[-30:])
            up._reader.join(5)
            tail = "\n".join(up.lines[-12:])
            assert f"{signal.Signals(sig).name} received; stopping" in tail
            for name in services:
                assert re.search(rf"{name} stopped \((exit code 0|by SIGTERM)\)", tail), tail
            assert not any(f.exists() for f in token_files)  # a clean stop takes the token files away
        # No orphans: every child is gone (for SIGKILL, via PR_SET_PDEATHSIG → SIGTERM → drain), ports are free.
        end = time.monotonic() + 30
        while any(_alive(p) for p in pids.values()) and time.monotonic() < end:
            time.sleep(0.2)
        assert not [name for name, p in pids.items() if _alive(p)]
        assert not any(_port_open(p) for p in (port, sender_port, receiver_port))
        if pair:
            assert f"receiver random:tiny-gemma on grpc 127.0.0.1:{sender_port}" in out
    finally:
        up.kill_all()


def test_up_refuses_a_busy_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        sender_port, receiver_port = _free_ports(2)
        r = subprocess.run([sys.executable, "-m", "telepathy.cli", "up", "--port", str(port), "--sender-port",
                            str(sender_port), "--receiver-port", str(receiver_port)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert f"port(s) [{port}] already in use on 127.0.0.1" in r.stdout
    assert "started" not in r.stdout  # nothing was launched


def test_sdk_reads_the_up_token_on_loopback_only(tmp_path, monkeypatch):
    """The SDK's side of the token file: used only for a loopback address, only when no token is configured,
    only when the file is this user's and private."""
    from telepathy.client import ReceiverClient, SenderClient, up_token_path
    from telepathy.serving.channels import ClientSettings

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("TELEPATHY_AUTH_TOKEN", raising=False)
    (port,) = _free_ports(1)
    path = up_token_path(port)
    assert path == tmp_path / "telepathy" / f"up-{port}.token"
    path.parent.mkdir()
    path.write_text("the-up-token\n")
    path.chmod(0o600)

    def token(address: str, settings: ClientSettings | None = None, cls=SenderClient) -> str:
        with cls(address, settings) as client:
            return client.settings.auth_token

    for address in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"dns:///localhost:{port}"):
        assert token(address) == "the-up-token", address
    assert token(f"127.0.0.1:{port}", cls=ReceiverClient) == "the-up-token"
    assert token(f"10.1.2.3:{port}") == ""  # another machine never gets it
    assert token(f"127.0.0.1:{port + 1 if port < 65535 else port - 1}") == ""  # another port: no file
    mine = ClientSettings(auth_token="mine")
    assert token(f"127.0.0.1:{port}", mine) == "mine"
    unset = ClientSettings()
    assert token(f"127.0.0.1:{port}", unset) == "the-up-token" and unset.auth_token == ""  # copied, not changed
    monkeypatch.setenv("TELEPATHY_AUTH_TOKEN", "from-env")
    assert token(f"127.0.0.1:{port}") == "from-env"
    monkeypatch.delenv("TELEPATHY_AUTH_TOKEN")
    path.chmod(0o644)  # readable by others: not a file `telepathy up` wrote
    assert token(f"127.0.0.1:{port}") == ""
