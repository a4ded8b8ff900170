"""A new task from files alone, end to end on the tiny random pair (the worked example of docs/TASKS.md), and what a
bridge folder and the engines know of their tasks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from telepathy.bridge.checkpoint import CheckpointError, read_meta
from telepathy.bridge.models import TINY_RECEIVER, TINY_SENDER
from telepathy.bridge.runtime.engine import ReceiverEngine, SenderEngine, load_bridge_set
from telepathy.bridge.tasks import BUILTIN_TASKS, BUILTINS, TaskConflictError, UnknownTaskError, load_task_file
from telepathy.bridge.training.evaluate import METHODS
from telepathy.cli import main as cli
from telepathy.contract import SHIPPED_BRIDGES
from tests.conftest import make_tiny_bridges

DOC = Path(__file__).resolve().parent.parent / "docs" / "TASKS.md"
URGENT = ["the server is down and customers cannot pay", "fire in the server room call now",
          "the site crashed again please help now", "critical failure in the payment system today",
          "the data center lost power an hour ago", "help the app failed for every user"]
CALM = ["thanks for the notes from the meeting last week", "next week we could talk about the newsletter",
        "a question about the lunch menu when you have time", "see you at the meeting next month",
        "here are the photos from the trip", "we could plan the party later this year"]
TINY_MODELS = ["--sender", TINY_SENDER, "--receiver", TINY_RECEIVER, "--device", "cpu"]


def worked_example(folder: Path) -> Path:
    """docs/TASKS.md's task file (its first YAML block, verbatim) with a few dozen rows of data beside it."""
    block = re.search(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S).group(1)
    folder.mkdir(parents=True)
    (folder / "task.yaml").write_text(block, encoding="utf-8")
    rows = [(f"{text} ({i})", label) for i in range(3) for label, texts in (("high", URGENT), ("low", CALM))
            for text in texts]  # 36 rows, label names
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    test = [(t, 1) for t in URGENT] + [(t, 0) for t in CALM]  # 12 rows, label indices
    (folder / "test.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in test))
    return folder / "task.yaml"


def test_the_worked_example_end_to_end(tmp_path, capsys):
    """train → classify → eval → report, with nothing but the task file and its data."""
    task_file = worked_example(tmp_path / "urgency")
    spec = load_task_file(task_file).spec
    bridge = tmp_path / "runs" / "urgency"
    assert cli(["train", "--task", str(task_file), "--out", str(bridge), "--steps", "4", "--eval-every", "2",
                "--warmup", "1", "--validation-size", "8", "--batch-size", "8", "--soft-tokens", "4", "--d-model",
                "32", "--heads", "4", "--d-wire", "16", "--no-cache", "--no-progress", *TINY_MODELS]) == 0
    assert "saved bridge urgency-" in capsys.readouterr().out
    meta = read_meta(bridge)
    assert meta.spec == spec and meta.task == "urgency" and meta.training["train_rows"] == 28
    stored = json.loads((bridge / "config.json").read_text())
    assert stored["task_spec"] == spec.to_dict() and stored["labels"] == ["low", "high"]
    assert read_meta(bridge).spec == spec  # the folder alone gives the spec back

    for task_args in (["--task", str(task_file)], []):  # a bridge knows its task: --task may be left out
        assert cli(["classify", *task_args, "--bridge", str(bridge), "--device", "cpu", "--json",
                    "the database is corrupt, please help now"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["task"] == "urgency" and doc["label"] in ("low", "high") and set(doc["scores"]) == {"low", "high"}

    results = tmp_path / "results"
    assert cli(["eval", "--task", str(task_file), "--bridge", str(bridge), "--seeds", "1", "--batch-size", "8",
                "--no-progress", "--out", str(results / "urgency.json"), "--device", "cpu"]) == 0
    assert "urgency / test (n = 12)" in capsys.readouterr().out
    doc = json.loads((results / "urgency.json").read_text())
    assert doc["task"] == "urgency" and doc["labels"] == ["low", "high"] and doc["n"] == 12
    assert list(doc["methods"]) == list(METHODS)
    assert all(0.0 <= a <= 1.0 for entry in doc["methods"].values() for a in entry["accuracy"])

    assert cli(["report", "--results", str(results), "--task", str(task_file)]) == 0
    table = (results / "summary.md").read_text()
    assert "| method | urgency test (n=12) |" in table and "| _chance_ | 50.0 |" in table


def test_commands_refuse_a_task_that_differs_from_the_bridge(tmp_path, tiny_sender, tiny_receiver, capsys):
    spec = load_task_file(worked_example(tmp_path / "urgency")).spec
    make_tiny_bridges(tmp_path / "bridges", tiny_sender, tiny_receiver, tasks=[spec])
    other = tmp_path / "urgency" / "other.yaml"
    other.write_text((tmp_path / "urgency" / "task.yaml").read_text().replace('"Urgency:"', '"Priority:"'))
    assert cli(["classify", "--task", str(other), "--bridge", str(tmp_path / "bridges" / "urgency"), "--device", "cpu",
                "x"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"telepathy classify: error: bridge {tmp_path / 'bridges' / 'urgency'} was trained for a task 'urgency' that "
        f"differs from {other} in primer, answer_prefix")
    assert cli(["classify", "--device", "cpu", "x"]) == 2
    assert capsys.readouterr().err.strip() == \
        "telepathy classify: error: --task is required without --bridge (a bridge folder knows its task)"


def test_old_bridge_folders_get_the_builtin_spec(tmp_path, tiny_sender, tiny_receiver):
    """A config.json without task_spec (written before it was stored) loads with the built-in of its name, and the
    fingerprint stays what it was."""
    make_tiny_bridges(tmp_path, tiny_sender, tiny_receiver, tasks=["trec"])
    config = tmp_path / "trec" / "config.json"
    new = read_meta(tmp_path / "trec")
    raw = json.loads(config.read_text())
    del raw["task_spec"]
    config.write_text(json.dumps(raw))
    old = read_meta(tmp_path / "trec")
    assert old.spec is BUILTIN_TASKS["trec"] and old.fingerprint == new.fingerprint == raw["fingerprint"]
    config.write_text(json.dumps({**raw, "task": "urgency"}))
    with pytest.raises(CheckpointError) as err:
        read_meta(tmp_path / "trec")
    assert str(err.value) == (f"{config}: no task_spec, and 'urgency' is not a built-in task, so the bridge's task is "
                              "unknown")
    config.write_text(json.dumps({**raw, "labels": ["a", "b", "c", "d", "e", "f"]}))
    with pytest.raises(CheckpointError, match=r"labels \['a', .*\] differs from the built-in task 'trec' \(\['ABBR'"):
        read_meta(tmp_path / "trec")
    config.write_text(json.dumps({**raw, "task_spec": {**new.spec.to_dict(), "labels": []}}))
    with pytest.raises(CheckpointError, match="invalid task_spec .labels: the list of labels is empty"):
        read_meta(tmp_path / "trec")


@pytest.mark.skipif(not SHIPPED_BRIDGES.is_dir(), reason="no shipped bridges in this installation")
def test_shipped_bridges_carry_the_builtin_specs():
    for config in sorted(SHIPPED_BRIDGES.glob("*/*/config.json")):
        meta, raw = read_meta(config.parent), json.loads(config.read_text())
        assert meta.spec == BUILTIN_TASKS[config.parent.name] and meta.fingerprint == raw["fingerprint"]


def test_engines_take_specs_from_their_bridges(tmp_path, tiny_sender, tiny_receiver):
    """The catalog of a BridgeSet: built-ins + the loaded bridges' tasks, per engine, with no global state."""
    spec = load_task_file(worked_example(tmp_path / "urgency")).spec
    root = make_tiny_bridges(tmp_path / "bridges", tiny_sender, tiny_receiver, tasks=[spec, "sst2"])
    receivers = load_bridge_set(root, tiny_receiver, "receiver", "cpu")
    assert list(receivers.tasks) == ["ag_news", "sst2", "trec", "urgency"]
    receiver = ReceiverEngine(tiny_receiver, receivers)
    sender = SenderEngine(tiny_sender, load_bridge_set(root, tiny_sender, "sender", "cpu"))
    latents, meta = sender.encode(["the server is down"], "urgency")
    probs, _ = receiver.classify_latents(latents, "urgency", meta.bridge_id)
    assert meta.spec == spec and probs.shape == (1, 2)
    assert receiver.classify_text(["urgent: the site is down"], "urgency").shape == (1, 2)
    assert len(sender.relay(["the server is down"], "urgency", max_tokens=2)) == 1
    bare = ReceiverEngine(tiny_receiver, load_bridge_set(tmp_path / "none", tiny_receiver, "receiver", "cpu"))
    with pytest.raises(UnknownTaskError):
        bare.classify_text(["x"], "urgency")  # another engine knows only the built-ins
    assert torch.allclose(bare.classify_text(["x"], "sst2").sum(-1), torch.ones(1))


def test_a_bridge_whose_spec_differs_from_the_builtin_is_an_error(tmp_path, tiny_sender, tiny_receiver):
    renamed = BUILTIN_TASKS["sst2"].model_copy(update={"labels": ("bad", "good")})
    make_tiny_bridges(tmp_path, tiny_sender, tiny_receiver, tasks=[renamed])
    with pytest.raises(TaskConflictError) as err:
        load_bridge_set(tmp_path, tiny_receiver, "receiver", "cpu")
    assert str(err.value) == (f"task 'sst2' of the bridge {tmp_path / 'sst2'} differs from the task of that name of the "
                              f"built-in task file {BUILTINS['sst2'].source} in labels; rename one of them")


def test_bench_takes_a_task_file(tmp_path):
    """`telepathy bench --task FILE` reads the task file's test split and asks the gateway for the task by name."""
    from telepathy.ops.bench import BenchConfig, load_texts

    cfg = BenchConfig(task=str(worked_example(tmp_path / "urgency")))
    assert cfg.loaded_task.name == "urgency" and cfg.task == str((tmp_path / "urgency" / "task.yaml").resolve())
    texts = load_texts(cfg.loaded_task)
    assert len(texts) == 12 and texts[0] == (URGENT[0], 1)
    assert BenchConfig().loaded_task is BUILTINS[next(iter(BUILTINS))]  # default: the first built-in
