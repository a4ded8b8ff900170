"""A task of one's own, served: the worked example of docs/TASKS.md trained a few steps on the tiny random pair, then
real services on loopback that know the task from the bridge folder alone, over HTTP (the gateway) and gRPC (the
SDK). Part 2 of tests/test_tasks_e2e.py, which trains, classifies and evaluates the same task in-process."""

from __future__ import annotations

import argparse

import grpc
import httpx
import pytest

from telepathy.bridge.checkpoint import read_meta
from telepathy.bridge.models import TINY_RECEIVER
from telepathy.bridge.tasks import BUILTIN_TASKS, BUILTINS, TaskFileError, load_task_file
from telepathy.cli import main as cli
from telepathy.client import ReceiverClient, SenderClient
from telepathy.config import SettingsError, from_sources
from telepathy.gateway.settings import GatewaySettings
from telepathy.ops.serve import register
from telepathy.receiver_service.app import build_receiver
from telepathy.receiver_service.settings import ReceiverSettings
from telepathy.sender_service.settings import SenderSettings
from telepathy.serving.channels import ClientSettings
from telepathy.testing import GatewayThread, ServiceThread
from tests.conftest import make_tiny_bridges
from tests.services_support import (
    ServiceProcess,
    assert_status,
    free_port,
    rpc_error,
    start_pair,
    start_receiver,
    start_sender,
)
from tests.test_tasks_e2e import TINY_MODELS, worked_example

TEXT = "the database is corrupt, please help now"
LABELS = ["low", "high"]
KNOWN = ", ".join(sorted([*BUILTIN_TASKS, "urgency"]))
UNKNOWN = f"task: unknown task 'imdb'; known tasks: {KNOWN}"  # what the services answer for a name they do not know
PLAIN = ClientSettings()  # no token: the services below require none (loopback)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The worked example's task file and data in a folder, and a bridge trained on them: (spec, bridge folder)."""
    root = tmp_path_factory.mktemp("urgency-served")
    task_file = worked_example(root / "urgency")
    bridge = root / "runs" / "urgency"
    assert cli(["train", "--task", str(task_file), "--out", str(bridge), "--steps", "4", "--eval-every", "2",
                "--warmup", "1", "--validation-size", "8", "--batch-size", "8", "--soft-tokens", "4", "--d-model",
                "32", "--heads", "4", "--d-wire", "16", "--no-cache", "--no-progress", *TINY_MODELS]) == 0
    return load_task_file(task_file).spec, bridge


def assert_urgency(result, path: str = "bridge") -> None:
    """An SDK Classification of the urgency task: its labels, in order, with probabilities that sum to one."""
    assert result.task == "urgency" and list(result.scores) == LABELS and result.label in LABELS
    assert abs(sum(result.scores.values()) - 1.0) < 1e-4
    assert result.bridge_id.startswith("urgency-") if path == "bridge" else result.bridge_id == ""


def test_services_serve_a_trained_custom_task_over_http_and_grpc(trained):
    """Receiver and sender load the bridge folder and nothing else of the task; the gateway knows no task at all."""
    spec, bridge = trained
    assert read_meta(bridge).spec == spec  # what the services will know of the task: the folder's copy
    receiver = start_receiver(bridge)
    sender = start_sender(bridge, receiver.address)
    try:
        settings = GatewaySettings(port=0, sender_addr=sender.address, receiver_addr=receiver.address)
        with GatewayThread(settings) as gw, httpx.Client(base_url=gw.url, timeout=60.0) as c:
            r = c.get("/v1/tasks")
            assert r.status_code == 200, r.text
            tasks = r.json()["tasks"]
            assert [t["name"] for t in tasks] == [*BUILTIN_TASKS, "urgency"]  # the built-ins, then the bridge's
            assert tasks[-1] == {"name": "urgency", "labels": LABELS, "bridge": True}
            assert all(t["bridge"] is False and t["labels"] == list(BUILTIN_TASKS[t["name"]].labels) for t in tasks[:-1])

            for path in ("bridge", "text"):
                r = c.post("/v1/classify", json={"task": "urgency", "text": TEXT, "path": path})
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["task"] == "urgency" and body["path"] == path and list(body["scores"]) == LABELS
                assert body["label"] == max(body["scores"], key=body["scores"].get)
                assert (body["bridge_id"] or "").startswith("urgency-") == (path == "bridge")

            r = c.post("/v1/classify", json={"task": "imdb", "text": TEXT})
            assert r.status_code == 404
            assert r.json() == {"error": {"type": "not_found_error", "message": UNKNOWN, "param": "task"}}
            r = c.post("/v1/classify", json={"task": "urgency", "text": TEXT})  # the service still answers
            assert r.status_code == 200 and r.json()["task"] == "urgency"

        with SenderClient(sender.address, PLAIN) as s, ReceiverClient(receiver.address, PLAIN) as rc:
            relayed = s.relay(TEXT, "urgency")
            assert_urgency(relayed)
            assert_urgency(s.relay(TEXT, "urgency", path="text"), "text")
            soft = s.encode(TEXT, "urgency")  # the soft tokens an agent hands to another, read by the receiver
            assert soft.task == "urgency" and soft.bridge_id == relayed.bridge_id
            direct = rc.classify(soft)
            assert_urgency(direct)
            assert direct.scores == pytest.approx(relayed.scores, abs=1e-5)  # the relay's own bridge-path answer
            assert_urgency(rc.classify_text(TEXT, "urgency"), "text")

            info = s.info()
            assert [(t.name, list(t.labels), t.bridge) for t in info.tasks][-1] == ("urgency", LABELS, True)
            r_info = rc.info()
            assert list(r_info.tasks) == ["urgency"] and [t.name for t in r_info.catalog] == [*BUILTIN_TASKS, "urgency"]
            # The run folder holds its last resumable checkpoint too (checkpoints/step_*/, a loadable bridge): listed,
            # but the task's default is the run's own bridge, the first by path.
            listed = rc.bridges()
            assert {(b.task, tuple(b.labels)) for b in listed} == {("urgency", tuple(LABELS))}
            assert listed[0].bridge_id == relayed.bridge_id == read_meta(bridge).bridge_id

            assert_status(rpc_error(s.relay, TEXT, "imdb"), grpc.StatusCode.NOT_FOUND, UNKNOWN, exact=True)
            assert_status(rpc_error(s.encode, TEXT, "imdb"), grpc.StatusCode.NOT_FOUND, UNKNOWN, exact=True)
            assert_status(rpc_error(rc.classify_text, TEXT, "imdb"), grpc.StatusCode.NOT_FOUND, UNKNOWN, exact=True)
            assert_urgency(s.relay(TEXT, "urgency"))  # still answering
    finally:
        sender.stop()
        receiver.stop()


def test_the_pair_serves_a_trained_custom_task(trained):
    """One process, both halves from the same folder: the custom task runs fused, on the text path and through
    the receiver API of the same port."""
    _, bridge = trained
    pair = start_pair(bridge)
    try:
        assert pair.service.fused_tasks == {"urgency"}
        with SenderClient(pair.address, PLAIN) as s, ReceiverClient(pair.address, PLAIN) as rc:
            fused = s.relay(TEXT, "urgency")
            assert_urgency(fused)
            assert fused.timings_us["wire"] == 0  # one model call, no hop
            assert_urgency(s.relay(TEXT, "urgency", path="text"), "text")
            assert rc.classify(s.encode(TEXT, "urgency")).scores == pytest.approx(fused.scores, abs=1e-5)
            assert_urgency(rc.classify_text(TEXT, "urgency"), "text")
            assert [(t.name, t.bridge) for t in s.info().tasks][-1] == ("urgency", True)
            assert_status(rpc_error(s.relay, TEXT, "imdb"), grpc.StatusCode.NOT_FOUND, UNKNOWN, exact=True)
            assert_status(rpc_error(rc.classify_text, TEXT, "imdb"), grpc.StatusCode.NOT_FOUND, UNKNOWN, exact=True)
    finally:
        pair.stop()


def test_a_bridge_whose_task_conflicts_with_a_builtin_stops_every_role(tmp_path, tiny_sender, tiny_receiver):
    """`telepathy serve` exits 1 with one line naming both specs, no traceback: the files are wrong, not the code."""
    renamed = BUILTIN_TASKS["sst2"].model_copy(update={"labels": ("bad", "good")})
    bridges = make_tiny_bridges(tmp_path / "bridges", tiny_sender, tiny_receiver, tasks=[renamed])
    message = (f"task 'sst2' of the bridge {bridges / 'sst2'} differs from the task of that name of the built-in task "
               f"file {BUILTINS['sst2'].source} in labels; rename one of them")
    procs = {role: ServiceProcess(role, free_port(), bridges, tmp_path) for role in ("receiver", "sender", "pair")}
    try:
        for role, proc in procs.items():
            assert proc.wait_exit(180) == 1, proc.log()
            log = proc.log()
            assert f"{role} failed to start: {message}\n" in log and "Traceback" not in log, log
    finally:
        for proc in procs.values():
            proc.kill()


def test_task_files_setting_serves_a_task_on_the_text_path(tmp_path, tiny_sender, tiny_receiver):
    """`--task-files` / TELEPATHY_TASK_FILES: a task with no bridge anywhere, served on the text path; the bridge
    path says there is no bridge for it. A missing file is a setting error, a bad one stops the start."""
    task_file = worked_example(tmp_path / "urgency")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "sender", "--task-files", str(task_file), "--task-files", str(task_file)])
    settings = from_sources(SenderSettings, {"task_files": args.task_files}, env={})
    assert settings.task_files == (str(task_file), str(task_file))  # the option, repeated
    env = {"TELEPATHY_TASK_FILES": f"{task_file}, {task_file}"}
    assert from_sources(ReceiverSettings, {}, env=env).task_files == (str(task_file), str(task_file))
    with pytest.raises(SettingsError) as err:
        from_sources(ReceiverSettings, {}, env={"TELEPATHY_TASK_FILES": str(tmp_path / "nope.yaml")})
    assert str(err.value) == f"--task-files / TELEPATHY_TASK_FILES: no such file: {tmp_path / 'nope.yaml'}"

    empty = tmp_path / "no-bridges"
    empty.mkdir()
    receiver = start_receiver(empty, task_files=(str(task_file),))
    sender = start_sender(empty, receiver.address, task_files=(str(task_file),))
    try:
        with SenderClient(sender.address, PLAIN) as s, ReceiverClient(receiver.address, PLAIN) as rc:
            assert_urgency(s.relay(TEXT, "urgency", path="text"), "text")
            assert_urgency(rc.classify_text(TEXT, "urgency"), "text")
            assert [(t.name, t.bridge) for t in s.info().tasks][-1] == ("urgency", False)
            assert [(t.name, t.bridge) for t in rc.info().catalog][-1] == ("urgency", False)
            assert_status(rpc_error(s.relay, TEXT, "urgency"), grpc.StatusCode.NOT_FOUND,
                          "task: no bridge is loaded for task 'urgency'; loaded tasks: []", exact=True)
    finally:
        sender.stop()
        receiver.stop()

    bad = tmp_path / "urgency" / "bad.yaml"
    bad.write_text(task_file.read_text().replace('verbalizers: [" low", " high"]', 'verbalizers: [" low"]'))
    failing = ServiceThread(lambda: build_receiver(ReceiverSettings(
        port=0, model=TINY_RECEIVER, bridges=str(empty), task_files=(str(bad),)), tiny_receiver), "receiver")
    try:
        with pytest.raises(TaskFileError) as err:  # read before the model is used: `telepathy serve` exits 1
            failing.start()
    finally:
        failing.stop()
    assert str(err.value) == f"task file {bad}: verbalizers: 1 verbalizers for 2 labels; give one per label, in the " \
                             "order of `labels`"
