"""Evaluation, report and classify on the tiny random pair: the results schema, fair baselines, merging, the
markdown table and bar chart, and clear errors for bad input (unknown task, missing bridge, wrong models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from telepathy.bridge.models import TINY_RECEIVER, TINY_SENDER
from telepathy.bridge.tasks import BUILTINS, get_task
from telepathy.bridge.training.baselines import PromptIds, PromptTuningRun, linear_probe, pick_shots, prompt_split
from telepathy.bridge.training.data import load_split, train_validation_split
from telepathy.bridge.training.evaluate import METHODS
from telepathy.bridge.training.hidden_cache import StatesStore
from telepathy.bridge.training.report import markdown_table, write_report
from telepathy.bridge.training.train import TrainConfig, train_bridges
from telepathy.cli import main as cli

TINY = dict(sender=TINY_SENDER, receiver=TINY_RECEIVER, soft_tokens=4, d_model=32, num_heads=4, d_wire=16,
            batch_size=12, validation_size=24, train_limit=60, warmup_steps=2, lr=3e-3, eval_every=4,
            checkpoint_every=4, steps=4)


@pytest.fixture(scope="module")
def sst2_bridges(tmp_path_factory, tiny_sender, tiny_receiver) -> Path:
    """Two tiny SST-2 bridges (seeds 0 and 1) in one folder, as `telepathy eval --bridge` expects."""
    root = tmp_path_factory.mktemp("sst2-bridges")
    configs = [TrainConfig(task="sst2", seed=s, **TINY) for s in (0, 1)]
    train_bridges(configs, [root / "seed0", root / "seed1"], tiny_sender, tiny_receiver, StatesStore(), progress=False)
    return root


def test_eval_all_methods_schema(sst2_bridges, tmp_path, capsys):
    out = tmp_path / "results" / "sst2.json"
    argv = ["eval", "--task", "sst2", "--bridge", str(sst2_bridges), "--seeds", "2", "--splits", "test,validation",
            "--limit", "8", "--batch-size", "8", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert cli(argv) == 0
    printed = capsys.readouterr().out
    assert "sst2 / test (n = 8)" in printed and "sst2 / validation (n = 8)" in printed
    for path, split in ((out, "test"), (out.with_name("sst2_validation.json"), "validation")):
        doc = json.loads(path.read_text())
        assert {k: doc[k] for k in ("task", "split", "n", "sender", "receiver")} == \
            {"task": "sst2", "split": split, "n": 8, "sender": TINY_SENDER, "receiver": TINY_RECEIVER}
        assert list(doc["methods"]) == list(METHODS)
        for name, entry in doc["methods"].items():
            seeds = 1 if name in ("sender_zero_shot", "receiver_zero_shot", "text_relay", "linear_probe") else 2
            assert len(entry["accuracy"]) == seeds, name
            assert all(0.0 <= a <= 1.0 for a in entry["accuracy"])
            assert entry["mean"] == pytest.approx(sum(entry["accuracy"]) / seeds, abs=1e-6)
            assert entry["std"] >= 0.0
        assert doc["wire"]["soft_tokens"] == 4 and doc["wire"]["d_wire"] == 16
        assert doc["wire"]["bytes_per_request"] == {"bf16": 128, "int8": 80}
        assert set(doc["wire"]["bridge_accuracy_by_dtype"]) == {"bf16", "int8"}
        assert doc["methods"]["bridge"]["accuracy"] == doc["wire"]["bridge_accuracy_by_dtype"]["int8"]["accuracy"]
        assert doc["methods"]["receiver_few_shot"]["k_per_class"] == 2
        assert doc["methods"]["text_relay"]["max_new_tokens"] == 48
        # prompt tuning ran with the bridge's own recorded budget
        assert doc["methods"]["prompt_tuning"]["steps"] == 4 and doc["methods"]["prompt_tuning"]["batch_size"] == 12
        assert doc["settings"]["train_rows"] == 60

    # methods run later merge into the same file
    doc_before = json.loads(out.read_text())
    assert cli([*argv[:-2], "--methods", "sender_zero_shot", "--out", str(out)]) == 0
    after = json.loads(out.read_text())
    assert list(after["methods"]) == list(METHODS) and after["wire"] == doc_before["wire"]
    assert all(after["methods"][m] == doc_before["methods"][m] for m in METHODS if m != "sender_zero_shot")
    assert after["methods"]["sender_zero_shot"]["accuracy"] == doc_before["methods"]["sender_zero_shot"]["accuracy"]

    # report: markdown table + bar chart
    written = write_report(out.parent, tmp_path / "report")
    table = written[0].read_text()
    assert "| method | sst2 test (n=8) | sst2 validation (n=8) |" in table and "| _chance_ | 50.0 | 50.0 |" in table
    assert written[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_errors(sst2_bridges, tmp_path, capsys):
    def error(*argv: str) -> str:
        assert cli(["eval", *argv, "--device", "cpu", "--no-progress"]) == 2
        return capsys.readouterr().err.strip()

    out = str(tmp_path / "r.json")
    assert error("--task", "imdb", "--bridge", str(sst2_bridges), "--out", out) == \
        "telepathy eval: error: unknown task 'imdb'; known tasks: ag_news, sst2, trec (or the path of a task file: .yaml, .yml or .json)"
    missing = tmp_path / "nope"
    assert error("--task", "sst2", "--bridge", str(missing), "--out", out) == \
        f"telepathy eval: error: bridge folder {missing} does not exist"
    (tmp_path / "empty").mkdir()
    assert error("--task", "sst2", "--bridge", str(tmp_path / "empty"), "--out", out) == \
        f"telepathy eval: error: no bridge checkpoint (config.json + model.safetensors) under {tmp_path / 'empty'}"
    assert error("--task", "trec", "--bridge", str(sst2_bridges), "--out", out) == \
        f"telepathy eval: error: bridge {sst2_bridges / 'seed0'} was trained for task 'sst2', not 'trec'"
    assert error("--task", "sst2", "--bridge", str(sst2_bridges), "--methods", "bridge,magic", "--out", out) == \
        "telepathy eval: error: unknown method(s) ['magic']; known: all, bridge, sender_zero_shot, " \
        "receiver_zero_shot, receiver_few_shot, text_relay, prompt_tuning, linear_probe"
    assert error("--task", "sst2", "--methods", "bridge", "--out", out) == \
        "telepathy eval: error: method 'bridge' needs --bridge"
    assert error("--task", "trec", "--splits", "validation", "--methods", "linear_probe", "--out", out) == \
        f"telepathy eval: error: task file {BUILTINS['trec'].source}: data.validation: not set, so task 'trec' has " \
        "no validation split (its splits: train, test)"
    # the bridge was trained for the tiny Gemma; the tiny Llama playing the receiver has another fingerprint
    message = error("--task", "sst2", "--bridge", str(sst2_bridges), "--receiver", TINY_SENDER, "--methods", "bridge",
                    "--out", out)
    assert message.startswith(f"telepathy eval: error: bridge {sst2_bridges / 'seed0'} was trained for receiver "
                              f"{TINY_RECEIVER} (Gemma3ForCausalLM") and f"but the loaded receiver is {TINY_SENDER}" in message


def test_classify_cli(sst2_bridges, capsys):
    bridge = str(sst2_bridges / "seed0")
    assert cli(["classify", "--task", "sst2", "--bridge", bridge, "--device", "cpu", "--json", "a great film"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["label"] in ("negative", "positive") and set(doc["scores"]) == {"negative", "positive"}
    assert sum(doc["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    assert doc["label"] == max(doc["scores"], key=doc["scores"].get)
    assert doc["wire"] == {"dtype": "int8", "bytes": 80} and doc["receiver"] == TINY_RECEIVER
    assert cli(["classify", "--task", "sst2", "--bridge", bridge, "--device", "cpu", "a great film"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == doc["label"] and len(lines) == 3

    def error(*argv: str) -> str:
        assert cli(["classify", "--device", "cpu", *argv]) == 2
        return capsys.readouterr().err.strip()

    assert error("--task", "imdb", "x") == "telepathy classify: error: unknown task 'imdb'; known tasks: ag_news, sst2, trec (or the path of a task file: .yaml, .yml or .json)"
    assert error("--task", "sst2", "--bridge", "/no/such/bridge", "x") == \
        "telepathy classify: error: bridge folder /no/such/bridge does not exist"
    assert error("--task", "sst2", "--bridge", bridge, "   ") == "telepathy classify: error: the text to classify is empty"
    assert error("--task", "trec", "--bridge", bridge, "x") == \
        f"telepathy classify: error: bridge {bridge} was trained for task 'sst2', not 'trec'"
    assert error("--task", "sst2", "--sender", TINY_SENDER, "--receiver", TINY_RECEIVER, "x").startswith(
        f"telepathy classify: error: no shipped bridge for task 'sst2' and the pair {TINY_SENDER} → {TINY_RECEIVER}")
    assert error("--task", "sst2", "--bridge", bridge, "--sender", TINY_RECEIVER, "x").startswith(
        f"telepathy classify: error: bridge {bridge} was trained for sender {TINY_SENDER}")


def test_few_shot_demonstrations_are_per_class_and_seeded():
    train, _ = train_validation_split("trec", 500)
    spec = get_task("trec")
    shots = pick_shots(train, spec, k=2, seed=0)
    assert sorted(label for _, label in shots) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert shots == pick_shots(train, spec, k=2, seed=0) and shots != pick_shots(train, spec, k=2, seed=1)
    assert all(len(text.split()) <= 40 for text, _ in shots)


def test_linear_probe_finds_a_separable_signal():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    x = torch.randn(300, 20, generator=g) + 3.0 * torch.nn.functional.one_hot(y, 20).float()
    result = linear_probe(x[:200], y[:200], x[200:250], y[200:250], [x[250:]], num_labels=3)
    assert float((result.predictions[0] == y[250:]).float().mean()) > 0.9
    assert result.validation_accuracy >= 0.85


def test_prompt_tuning_reads_the_text_after_bos(tiny_receiver):
    rows = load_split("trec", "test", limit=3)
    split = prompt_split(tiny_receiver, get_task("trec"), rows, max_text_tokens=256)
    run = PromptTuningRun("pt", TrainConfig(task="trec", **{**TINY, "soft_tokens": 5}), tiny_receiver, split, split)
    idx = torch.arange(3)
    embeds, mask, _ = run.inputs(split.source, idx)
    ids, ids_mask = split.source.batch(idx)
    assert embeds.shape[1] == ids.shape[1] + 5 and mask.shape == embeds.shape[:2]
    torch.testing.assert_close(embeds[:, 0], tiny_receiver.embed(ids[:, :1])[:, 0])  # BOS first
    torch.testing.assert_close(embeds[:, 6:], tiny_receiver.embed(ids[:, 1:]))  # then the text prompt
    soft = run.module()
    assert soft.shape == (5, tiny_receiver.hidden_size)
    torch.testing.assert_close(soft.pow(2).mean(-1).sqrt(), torch.full((5,), tiny_receiver.embedding_rms_median()),
                               rtol=1e-2, atol=0)  # the receiver's embedding norm (up to the RMS epsilon)
    assert isinstance(split.source, PromptIds) and int(mask.sum()) == int(ids_mask.sum()) + 15


def test_markdown_table_marks_the_best():
    docs = [{"task": "trec", "split": "test", "n": 500, "methods": {
        "bridge": {"accuracy": [0.9, 0.92], "mean": 0.91, "std": 0.014},
        "linear_probe": {"accuracy": [0.8], "mean": 0.8, "std": 0.0}}}]
    table = markdown_table(docs)
    assert "| bridge | **91.0 ± 1.4** |" in table and "| linear_probe | 80.0 |" in table
    assert "| _chance_ | 16.7 |" in table


def test_gpu_pipeline_script_end_to_end_on_the_tiny_pair(tmp_path):
    """`python tools/gpu_experiments.py` (the GPU run) on the tiny pair: ablation → bridges → every method → archives."""
    import subprocess
    import sys
    import tarfile

    root = Path(__file__).resolve().parent.parent
    argv = ["--role", "all", "--work", str(tmp_path / "w"), "--pack", str(tmp_path / "out"), "--sender", TINY_SENDER,
            "--receiver", TINY_RECEIVER, "--d-model", "32", "--num-heads", "4", "--ablation-k", "4,8",
            "--ablation-d-wire", "full,8", "--reference-k", "8", "--steps", "4", "--eval-every", "2",
            "--train-limit", "60", "--validation-size", "24", "--limit", "6", "--seeds", "1", "--tasks", "trec,sst2",
            "--device", "cpu", "--no-progress", "--threads", "1"]
    run = subprocess.run([sys.executable, "tools/gpu_experiments.py", *argv], cwd=root, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    results = tmp_path / "w" / "results"
    ablation = json.loads((results / "wire_ablation.json").read_text())
    assert len(ablation["rows"]) == 8 and ablation["chosen"]["bytes"] == min(
        r["bytes"] for r in ablation["rows"]
        if r["validation_accuracy"] >= ablation["reference"]["validation_accuracy"] - 0.01)
    trec = json.loads((results / "trec.json").read_text())
    assert list(trec["methods"]) == list(METHODS) and trec["wire"]["soft_tokens"] == ablation["chosen"]["soft_tokens"]
    assert json.loads((results / "sst2_validation.json").read_text())["split"] == "validation"
    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out == ["results.tar.gz", "shipped_sst2.tar", "shipped_trec.tar"]
    with tarfile.open(tmp_path / "out" / "shipped_trec.tar") as tar:
        assert sorted(tar.getnames()) == [f"random_tiny-llama__random_tiny-gemma/trec/{n}"
                                          for n in ("config.json", "model.safetensors")]
