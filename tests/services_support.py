"""Helpers for the services tests: real servers on loopback (in-process threads or `telepathy serve` subprocesses)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.models import TINY_RECEIVER, TINY_SENDER
from telepathy.pair_service.app import build_pair
from telepathy.pair_service.settings import PairSettings
from telepathy.protos.v1 import common_pb2, receiver_pb2, receiver_pb2_grpc, sender_pb2, sender_pb2_grpc
from telepathy.receiver_service.app import build_receiver
from telepathy.receiver_service.settings import ReceiverSettings
from telepathy.sender_service.app import build_sender
from telepathy.sender_service.settings import SenderSettings
from telepathy.serving.channels import ClientSettings, make_sync_channel
from telepathy.testing import ServiceThread, free_port, wait_until_serving  # noqa: F401  (free_port: for the tests)

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 30.0  # generous per-call deadline: the test machine is shared and busy


def start_receiver(bridges, **overrides) -> ServiceThread:
    values = {**dict(port=0, model=TINY_RECEIVER, bridges=str(bridges), grace_s=5.0), **overrides}
    lm = LanguageModel.load(TINY_RECEIVER)  # one per service: the model thread owns it
    return ServiceThread(lambda: build_receiver(ReceiverSettings(**values), lm), "receiver").start()


def start_sender(bridges, receiver_addr: str, **overrides) -> ServiceThread:
    values = {**dict(port=0, model=TINY_SENDER, bridges=str(bridges), receiver_addr=receiver_addr, grace_s=5.0,
                     receiver_wait_s=2.0), **overrides}
    lm = LanguageModel.load(TINY_SENDER)
    return ServiceThread(lambda: build_sender(SenderSettings(**values), lm), "sender").start()


def start_pair(bridges, **overrides) -> ServiceThread:
    """Sender and receiver in one service (pair_service) on one port."""
    values = {**dict(port=0, model=TINY_SENDER, receiver_model=TINY_RECEIVER, bridges=str(bridges), grace_s=5.0), **overrides}
    lms = LanguageModel.load(TINY_SENDER), LanguageModel.load(TINY_RECEIVER)
    return ServiceThread(lambda: build_pair(PairSettings(**values), *lms), "pair").start()


def sender_stub(address: str, settings: ClientSettings | None = None):
    return sender_pb2_grpc.SenderStub(make_sync_channel(address, settings))


def receiver_stub(address: str, settings: ClientSettings | None = None):
    return receiver_pb2_grpc.ReceiverStub(make_sync_channel(address, settings))


def relay(task: str = "sst2", text: str = "a fine film", path=sender_pb2.PATH_BRIDGE, **kw) -> sender_pb2.RelayRequest:
    return sender_pb2.RelayRequest(task=task, text=text, path=path, **kw)


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def assert_status(err: grpc.RpcError, code: grpc.StatusCode, message: str, exact: bool = False) -> None:
    assert err.code() == code, f"{err.code()} {err.details()}"
    if exact:
        assert err.details() == message
    else:
        assert message in err.details(), err.details()


def field_trailer(err: grpc.RpcError) -> str:
    return dict(err.trailing_metadata() or ()).get("telepathy-error-field", "")


def metric(text: str, name: str, **labels) -> float:
    """Value of one sample in a Prometheus exposition (0.0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        if all(got.get(k) == str(v) for k, v in labels.items()):
            return float(m.group(4))
    return 0.0


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.02, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def soft_tokens_for(sender_address: str, text: str, task: str, dtype=common_pb2.DTYPE_INT8) -> common_pb2.SoftTokens:
    """Real soft tokens from the sender service (Encode)."""
    resp = sender_stub(sender_address).Encode(sender_pb2.EncodeRequest(task=task, text=text, wire_dtype=dtype), timeout=TIMEOUT)
    return resp.soft_tokens


def classify_request(st: common_pb2.SoftTokens) -> receiver_pb2.ClassifyRequest:
    return receiver_pb2.ClassifyRequest(soft_tokens=st)


class ServiceProcess:
    """`python -m telepathy.cli serve ROLE …` as a real subprocess with its own log file."""

    def __init__(self, role: str, port: int, bridges, log_dir: Path, *args: str, env: dict | None = None,
                 model: str | None = None):
        self.role, self.port = role, port
        self.address = f"127.0.0.1:{port}"
        model = model or (TINY_RECEIVER if role == "receiver" else TINY_SENDER)
        cmd = [sys.executable, "-m", "telepathy.cli", "serve", role, "--model", model, "--bridges", str(bridges),
               "--port", str(port), "--device", "cpu", *(["--receiver-model", TINY_RECEIVER] if role == "pair" else []), *args]
        clean = {k: v for k, v in os.environ.items() if not k.startswith("TELEPATHY_")}
        clean.update(env or {})
        clean["PYTHONUNBUFFERED"] = "1"
        self.log_path = log_dir / f"{role}-{port}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=clean, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_serving(self, timeout: float = 120.0, settings: ClientSettings | None = None) -> ServiceProcess:
        try:
            wait_until_serving(self.address, settings, timeout, alive=lambda: self.proc.poll() is None)
        except Exception:  # noqa: BLE001 - any start-up failure reads as this assertion, with the service's log
            raise AssertionError(f"{self.role} did not start:\n{self.log()}") from None
        return self

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 60.0) -> int:
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self._log.close()


def soft_tokens_changed(good: common_pb2.SoftTokens, **changes) -> common_pb2.SoftTokens:
    """A copy of `good` with fields changed: `task="x"`, `tokens__shape=[4, 64]` (a field of .tokens),
    `tokens__scales=None` (cleared)."""
    st = common_pb2.SoftTokens()
    st.CopyFrom(good)
    for path, value in changes.items():
        target, name = st, path
        if "__" in path:
            target, name = st.tokens, path.split("__", 1)[1]
        if name == "shape":
            del target.shape[:]
            target.shape.extend(value)
        elif value is None:
            target.ClearField(name)
        else:
            setattr(target, name, value)
    return st

