"""The bridges shipped in the package, on the real embedded pair (SmolLM2-135M-Instruct → Gemma-3-270m).

Marked `realmodel` (run with `make test-real`): loads both real models on the CPU, then classifies the first 100
test rows of every task through the full in-process path (encoder → int8 wire bytes → adapter → receiver).
"""

from __future__ import annotations

import json

import pytest

from telepathy.bridge.checkpoint import find_bridges, read_meta
from telepathy.bridge.classify import Classifier, shipped_bridge_dir
from telepathy.bridge.models import DEFAULT_RECEIVER, DEFAULT_SENDER
from telepathy.bridge.tasks import TASKS
from telepathy.bridge.training.data import load_split

pytestmark = [
    pytest.mark.realmodel,
    pytest.mark.skipif(not all(find_bridges(shipped_bridge_dir(t)) for t in TASKS),
                       reason="no shipped bridges yet under bridge/bridges/ (docs/RESULTS.md: the GPU run that trains them)"),
]

# Chance is 25 % (AG News), 16.7 % (TREC), 50 % (SST-2); the shipped bridges score ~85-97 % on the full test sets.
MIN_ACCURACY = {"ag_news": 0.75, "trec": 0.75, "sst2": 0.75}


def test_every_task_has_a_small_shipped_bridge():
    for task in TASKS:
        folder = shipped_bridge_dir(task)
        assert find_bridges(folder) == [folder], task
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
        assert (folder / "model.safetensors").stat().st_size <= 10 * 1000 * 1000
        meta = read_meta(folder)
        assert meta.task == task and meta.sender.spec == DEFAULT_SENDER and meta.receiver.spec == DEFAULT_RECEIVER
        assert meta.training["validation_accuracy"] > 0.8


@pytest.fixture(scope="module")
def classifier():
    from telepathy.bridge.lm import LanguageModel

    try:
        sender = LanguageModel.load(DEFAULT_SENDER)
        receiver = LanguageModel.load(DEFAULT_RECEIVER)
    except FileNotFoundError as exc:  # EmbeddedModelMissing: the model wheels are not installed
        pytest.skip(str(exc))
    return Classifier(sender, receiver, [shipped_bridge_dir(task) for task in TASKS])


@pytest.mark.parametrize("task", sorted(TASKS))
def test_shipped_bridge_accuracy_on_100_test_rows(classifier, task):
    rows = load_split(task, "test", limit=100)
    correct = 0
    for start in range(0, len(rows), 25):
        batch = rows[start:start + 25]
        probs, meta, nbytes = classifier.classify([r.text for r in batch], task)
        correct += sum(int(p.argmax()) == r.label for p, r in zip(probs, batch))
    accuracy = correct / len(rows)
    assert accuracy >= MIN_ACCURACY[task], f"{task}: {accuracy:.2f}"
    assert nbytes == meta.config.num_latents * meta.config.d_wire + 4 * meta.config.num_latents  # int8 + scales


def test_classify_command_uses_the_shipped_bridge(capsys):
    from telepathy.cli import main as cli

    assert cli(["classify", "--task", "sst2", "--device", "cpu", "--json",
                "A gorgeous, moving film with wonderful performances."]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["label"] == "positive" and doc["probabilities"]["positive"] > 0.5
    assert doc["bridge_id"].startswith("sst2-") and doc["sender"] == DEFAULT_SENDER
