"""Bridge training on the tiny random pair: the loss falls, runs are deterministic and resumable, training builds
the receiver input exactly as serving does, the hidden-state cache is faithful, bad CLI input fails clearly, and
the run-config file train writes reproduces the run (`--config`, command-line options over it)."""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from telepathy.bridge.checkpoint import load_bridge, read_meta
from telepathy.bridge.models import TINY_RECEIVER, TINY_SENDER
from telepathy.bridge.runtime.engine import ReceiverEngine, SenderEngine, load_bridge_set
from telepathy.bridge.training.config import RUN_CONFIG_FILE, read_run_config
from telepathy.bridge.training.data import load_split
from telepathy.bridge.training.hidden_cache import SenderStates, StatesStore, compute_sender_states, sender_states
from telepathy.bridge.training.train import (
    TrainConfig,
    batch_similarity,
    lr_at,
    make_bridge_runs,
    train_bridges,
    train_jointly,
)
from telepathy.cli import main as cli

TINY = dict(sender=TINY_SENDER, receiver=TINY_RECEIVER, soft_tokens=4, d_model=32, num_heads=4, d_wire=16,
            batch_size=12, validation_size=24, train_limit=120, warmup_steps=3, lr=3e-3, eval_every=5,
            checkpoint_every=5)
TINY_CLI = ["--sender", TINY_SENDER, "--receiver", TINY_RECEIVER, "--soft-tokens", "4", "--d-model", "32",
            "--heads", "4", "--d-wire", "16", "--batch-size", "12", "--validation-size", "24", "--train-limit", "60", "--no-cache",
            "--no-progress", "--device", "cpu"]


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_loss_falls_on_the_tiny_pair(tmp_path, tiny_sender, tiny_receiver):
    config = TrainConfig(task="trec", steps=40, **TINY)
    (meta,) = train_bridges([config], [tmp_path / "b"], tiny_sender, tiny_receiver, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "b" / "diagnostics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 41))
    first = sum(r["ce"] for r in train[:8]) / 8
    last = sum(r["ce"] for r in train[-8:]) / 8
    assert last < first - 0.05, (first, last)
    assert {"step", "loss", "lr", "grad_norm", "soft_rms", "diversity", "train_acc"} <= set(train[0])
    assert [r["step"] for r in rows if "val_accuracy" in r] == [5, 10, 15, 20, 25, 30, 35, 40]
    # lr: warmup then cosine; the soft tokens arrive at the receiver's embedding norm
    assert train[0]["lr"] == pytest.approx(1e-3) and train[2]["lr"] == pytest.approx(3e-3)
    assert train[-1]["lr"] < train[10]["lr"]
    assert train[0]["soft_rms"] == pytest.approx(tiny_receiver.embedding_rms_median(), rel=0.05)
    t = meta.training
    for key in ("steps", "seed", "lr", "batch_size", "validation_accuracy", "wall_time_s", "device", "sender", "receiver"):
        assert key in t
    assert t["steps"] == 40 and t["sender"] == TINY_SENDER and t["diversity_weight"] == 0.1
    assert t["validation_accuracy"] == max(r["val_accuracy"] for r in rows if "val_accuracy" in r)


def test_same_seed_same_bridge_other_seed_other_bridge(tiny_sender, tiny_receiver):
    def train(seed: int):
        runs = make_bridge_runs([TrainConfig(task="sst2", steps=6, seed=seed, **TINY)], tiny_sender, tiny_receiver,
                                [None], StatesStore())
        train_jointly(runs, 6, progress=False)
        return _weights(runs[0].module)

    a, b, c = train(0), train(0), train(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_joint_training_equals_training_alone(tiny_sender, tiny_receiver):
    """Runs sharing the receiver's forward get the gradients they would get alone."""
    store = StatesStore()
    cfg_a = TrainConfig(task="sst2", steps=4, seed=0, **TINY)
    cfg_b = TrainConfig(task="trec", steps=4, seed=1, **{**TINY, "soft_tokens": 8})
    alone = make_bridge_runs([cfg_a], tiny_sender, tiny_receiver, [None], store)
    start = torch.cat([p.detach().flatten() for p in alone[0].module.parameters()])
    train_jointly(alone, 4, progress=False)
    joint = make_bridge_runs([cfg_a, cfg_b], tiny_sender, tiny_receiver, [None, None], store)
    train_jointly(joint, 4, progress=False)
    moved_alone = torch.cat([p.detach().flatten() for p in alone[0].module.parameters()]) - start
    moved_joint = torch.cat([p.detach().flatten() for p in joint[0].module.parameters()]) - start
    # Same updates up to float rounding of other batch shapes (Adam amplifies rounding on ~0 gradients a little).
    assert (moved_alone - moved_joint).norm() < 0.02 * moved_alone.norm()


def test_resume_continues_exactly(tmp_path, tiny_sender, tiny_receiver):
    config = TrainConfig(task="ag_news", steps=10, seed=3, **TINY)
    store = StatesStore()
    full = make_bridge_runs([config], tiny_sender, tiny_receiver, [tmp_path / "full"], store)
    train_jointly(full, 10, progress=False)

    first = make_bridge_runs([config], tiny_sender, tiny_receiver, [tmp_path / "cut"], store)
    train_jointly(first, 5, progress=False)  # "killed" after the checkpoint at step 5
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step_000005"]
    # the periodic checkpoint is itself a loadable bridge
    load_bridge(tmp_path / "cut" / "checkpoints" / "step_000005", tiny_sender.fingerprint(), tiny_receiver.fingerprint())
    second = make_bridge_runs([config], tiny_sender, tiny_receiver, [tmp_path / "cut"], store)
    assert second[0].resume() and second[0].step == 5
    train_jointly(second, 10, progress=False)
    wf, wr = _weights(full[0].module), _weights(second[0].module)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    lines = (tmp_path / "cut" / "diagnostics.jsonl").read_text().splitlines()
    assert lines == (tmp_path / "full" / "diagnostics.jsonl").read_text().splitlines()


def test_resume_refuses_other_settings(tmp_path, tiny_sender, tiny_receiver):
    config = TrainConfig(task="sst2", steps=5, **TINY)
    runs = make_bridge_runs([config], tiny_sender, tiny_receiver, [tmp_path], StatesStore())
    train_jointly(runs, 5, progress=False)
    other = make_bridge_runs([TrainConfig(task="sst2", steps=5, **{**TINY, "lr": 1e-3})], tiny_sender, tiny_receiver,
                             [tmp_path], StatesStore())
    with pytest.raises(ValueError, match=r"cannot resume sst2-seed0: the checkpoint was made with other settings.*'lr'"):
        other[0].resume()


def test_training_layout_is_the_serving_layout(tmp_path, tiny_sender, tiny_receiver):
    """A trained bridge predicts the same through the services' engines as inside the trainer."""
    config = TrainConfig(task="trec", steps=5, **TINY)
    store = StatesStore()
    (run,) = make_bridge_runs([config], tiny_sender, tiny_receiver, [None], store)
    train_jointly([run], 5, progress=False)
    run.save_final(tmp_path / "b", dtype=torch.float32)
    rows = load_split("trec", "test", limit=10)
    states = store.get(tiny_sender, [r.text for r in rows], run.bridge_config.sender_layer)
    trainer = run.predict(states, len(rows)).exp()
    sender = SenderEngine(tiny_sender, load_bridge_set(tmp_path, tiny_sender, "sender", "cpu"))
    receiver = ReceiverEngine(tiny_receiver, load_bridge_set(tmp_path, tiny_receiver, "receiver", "cpu"))
    served, _ = receiver.classify_latents(sender.encode([r.text for r in rows], "trec")[0], "trec")
    torch.testing.assert_close(trainer, served, rtol=1e-4, atol=1e-5)


def test_hidden_states_cache(tmp_path, tiny_sender):
    texts = ["the team won the final", "stocks fell", "what is the capital of france ?"]
    states = compute_sender_states(tiny_sender, texts, layer=2, batch_size=2)
    assert len(states) == 3 and states.states.dtype == torch.float32
    batch, mask = states.batch([2, 0])
    ids, ref_mask = tiny_sender.tokenize([texts[2], texts[0]])
    ref = tiny_sender.hidden_states(ids, ref_mask, 2)
    T = batch.shape[1]
    assert torch.equal(mask, ref_mask[:, :T])
    torch.testing.assert_close(batch * mask[..., None], ref[:, :T] * ref_mask[:, :T, None], rtol=1e-5, atol=1e-5)
    pooled = states.mean_pooled()
    torch.testing.assert_close(pooled[1], states.batch([1])[0][0, : int(states.lengths[1])].mean(0))

    first = sender_states(tiny_sender, texts, 2, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = sender_states(tiny_sender, texts, 2, cache_dir=tmp_path)
    assert files[0].stat().st_mtime_ns == mtime and torch.equal(first.states, again.states)
    assert torch.equal(SenderStates.load(files[0]).lengths, states.lengths)
    files[0].write_bytes(b"garbage")  # a damaged entry is recomputed, not trusted
    assert torch.equal(sender_states(tiny_sender, texts, 2, cache_dir=tmp_path).states, states.states)


def test_schedule_and_similarity():
    assert lr_at(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(99, 100, 1.0, 10, 0.1) == pytest.approx(0.1, abs=1e-3)
    same = torch.ones(4, 3, 8)
    assert batch_similarity(same) == pytest.approx(1.0)
    eye = torch.eye(4).reshape(4, 1, 4)
    assert batch_similarity(eye) == pytest.approx(0.0)


def test_config_validation():
    with pytest.raises(KeyError, match="unknown task 'imdb'; known tasks: ag_news, sst2, trec"):
        TrainConfig(task="imdb")
    with pytest.raises(ValueError, match=r"TrainConfig.d_wire \(600\) cannot exceed d_model \(512\)"):
        TrainConfig(task="trec", d_wire=600)
    with pytest.raises(ValueError, match="batch_size must be ≥ the 6 labels of trec"):
        TrainConfig(task="trec", batch_size=4)


def test_train_cli_and_its_errors(tmp_path, capsys):
    out = tmp_path / "b"
    assert cli(["train", "--task", "sst2", "--steps", "3", "--eval-every", "3", "--out", str(out), *TINY_CLI]) == 0
    assert "saved bridge sst2-" in capsys.readouterr().out
    assert read_meta(out).training["steps"] == 3

    def error(*argv: str) -> str:
        assert cli(["train", *argv]) == 2
        return capsys.readouterr().err.strip()

    assert error("--task", "imdb", "--out", str(tmp_path / "x"), *TINY_CLI) == \
        "telepathy train: error: unknown task 'imdb'; known tasks: ag_news, sst2, trec (or the path of a task file: .yaml, .yml or .json)"
    assert error("--task", "sst2", "--out", str(out), *TINY_CLI) == \
        f"telepathy train: error: {out} already holds a trained bridge; pass --resume to continue it or choose another --out"
    assert error("--task", "sst2", "--resume", "--out", str(tmp_path / "new"), *TINY_CLI) == \
        f"telepathy train: error: --resume: no checkpoint under {tmp_path / 'new' / 'checkpoints'}"
    assert error("--task", "sst2", "--out", str(tmp_path / "y"), *TINY_CLI, "--d-wire", "64") == \
        "telepathy train: error: TrainConfig.d_wire (64) cannot exceed d_model (32)"
    assert error("--task", "sst2", "--sender", "random:nope", "--out", str(tmp_path / "z"), *TINY_CLI[2:]).startswith(
        "telepathy train: error: unknown random preset 'nope'")


def test_resume_cli_finishes_a_cut_run(tmp_path, tiny_sender, tiny_receiver, capsys):
    config = TrainConfig(task="trec", steps=6, **{**TINY, "train_limit": 60, "checkpoint_every": 3, "eval_every": 3})
    runs = make_bridge_runs([config], tiny_sender, tiny_receiver, [tmp_path], StatesStore())
    train_jointly(runs, 3, progress=False)  # cut after the step-3 checkpoint, before the final save
    assert not (tmp_path / "config.json").exists()
    argv = ["train", "--task", "trec", "--steps", "6", "--eval-every", "3", "--checkpoint-every", "3", "--warmup", "3",
            "--lr", "0.003", "--resume", "--out", str(tmp_path), *TINY_CLI]
    assert cli(argv) == 0
    meta = read_meta(tmp_path)
    assert [h["step"] for h in meta.training["validation_history"]] == [3, 6]
    assert read_run_config(tmp_path / RUN_CONFIG_FILE)["steps"] == 6  # written once the resumed run is done


WARMUP_WARNING = ("steps (2) < warmup_steps (5): the learning rate never reaches its peak 0.003 (the last step uses "
                  "0.0012); use fewer warm-up steps (--warmup) or more steps (--steps)")


def test_fewer_steps_than_warmup_warns_and_every_file_written_is_readable(tmp_path, caplog):
    """A run shorter than its warm-up never reaches the peak learning rate: `telepathy train` says so. And every
    file train, eval and report write (the bridge, the periodic checkpoint with the trainer state, diagnostics, the
    run config, the hidden-state cache, results, summary, chart) gets 0666 minus the umask like any file the user
    writes: safetensors alone makes 0600, which the container images' non-root user could not read."""
    out, cache, results = tmp_path / "bridge", tmp_path / "cache", tmp_path / "results"
    previous = os.umask(0o022)
    try:
        with caplog.at_level(logging.WARNING):
            assert cli(["train", "--task", "sst2", "--steps", "2", "--warmup", "5", "--lr", "0.003", "--eval-every", "2",
                        "--checkpoint-every", "1", "--cache-dir", str(cache), "--out", str(out),
                        *(a for a in TINY_CLI if a != "--no-cache")]) == 0
        assert cli(["eval", "--task", "sst2", "--bridge", str(out), "--methods", "bridge", "--seeds", "1", "--limit", "8",
                    "--device", "cpu", "--no-progress", "--out", str(results / "sst2.json")]) == 0
        assert cli(["report", "--results", str(results)]) == 0
    finally:
        os.umask(previous)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if "warmup_steps" in w] == [f"sst2-seed0: {WARMUP_WARNING}"]

    written = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    for name in ("bridge/model.safetensors", "bridge/config.json", "bridge/diagnostics.jsonl",
                 f"bridge/{RUN_CONFIG_FILE}", "bridge/checkpoints/step_000002/model.safetensors",
                 "bridge/checkpoints/step_000002/trainer_state.safetensors",
                 "bridge/checkpoints/step_000002/trainer_state.json", "results/sst2.json", "results/summary.md",
                 "results/accuracy.png"):
        assert name in written, sorted(written)
    assert any(n.startswith("cache/") and n.endswith(".safetensors") for n in written), sorted(written)
    wrong = {n: oct(m) for n, m in written.items() if m != (0o755 if (tmp_path / n).is_dir() else 0o644)}
    assert not wrong, wrong


def test_no_warmup_warning_when_the_run_reaches_the_peak(tiny_sender, tiny_receiver, caplog):
    runs = make_bridge_runs([TrainConfig(task="sst2", steps=3, **TINY)], tiny_sender, tiny_receiver, [None],
                            StatesStore())  # TINY: warmup_steps=3, so the last step runs at the peak
    with caplog.at_level(logging.WARNING):
        train_jointly(runs, 3, progress=False)
    assert not [r for r in caplog.records if "warmup_steps" in r.getMessage()]


@pytest.mark.slow
def test_real_pair_trains_a_few_steps(tmp_path):
    """The embedded pair end to end on the CPU: the default bridge shape, a finite falling-or-not loss, ≤ 10 MB."""
    from telepathy.bridge.lm import LanguageModel
    from telepathy.bridge.models import DEFAULT_RECEIVER, DEFAULT_SENDER

    try:
        sender, receiver = LanguageModel.load(DEFAULT_SENDER), LanguageModel.load(DEFAULT_RECEIVER)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    config = TrainConfig(task="trec", steps=3, batch_size=6, train_limit=12, validation_size=6, eval_every=3,
                         warmup_steps=1)
    (meta,) = train_bridges([config], [tmp_path / "b"], sender, receiver, progress=False)
    assert meta.config.sender_layer == 24 and meta.config.num_latents == config.soft_tokens
    rows = [json.loads(line) for line in (tmp_path / "b" / "diagnostics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    assert (tmp_path / "b" / "model.safetensors").stat().st_size <= 10 * 1000 * 1000
    load_bridge(tmp_path / "b", sender.fingerprint(), receiver.fingerprint())


# --------------------------------------------------------------------------------------------- run-config files

CONFIG_ARGV = ["train", "--task", "sst2", "--steps", "3", "--eval-every", "3", *TINY_CLI]


@pytest.fixture(scope="module")
def trained_with_cli(tmp_path_factory) -> Path:
    """One tiny bridge trained through the CLI: its out folder holds train_config.yaml."""
    out = tmp_path_factory.mktemp("cli-run") / "a"
    assert cli([*CONFIG_ARGV, "--out", str(out)]) == 0
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_train_writes_its_full_config(trained_with_cli):
    path = trained_with_cli / RUN_CONFIG_FILE
    values = read_run_config(path)
    assert list(values) == [*(f.name for f in fields(TrainConfig)), "dtype"]  # every field, in order
    # TINY_CLI's options, TrainConfig's defaults for the rest
    expected = TrainConfig(task="sst2", **{**TINY, "steps": 3, "eval_every": 3, "train_limit": 60, "warmup_steps": 50,
                                           "lr": 2e-4, "checkpoint_every": 200})
    assert values == {**expected.to_dict(), "dtype": "float32"}
    text = path.read_text()
    assert text.startswith("# telepathy ") and "sender_layer: null  # None: round(0.8 × sender layers) = 3" in text
    assert read_meta(trained_with_cli).training["steps"] == 3


def test_train_prints_the_config_path(tmp_path, capsys):
    assert cli([*CONFIG_ARGV, "--out", str(tmp_path / "b")]) == 0
    assert f"run config: {tmp_path / 'b' / RUN_CONFIG_FILE}\n" in capsys.readouterr().out


def test_config_file_reproduces_the_run(trained_with_cli, tmp_path):
    """`--config` alone (no --task, no model options) trains the same bridge: same weights, same metrics."""
    again = tmp_path / "again"
    assert cli(["train", "--config", str(trained_with_cli / RUN_CONFIG_FILE), "--out", str(again), "--no-cache",
                "--no-progress"]) == 0
    first, second = _tensors(trained_with_cli), _tensors(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    a, b = read_meta(trained_with_cli), read_meta(again)
    assert a.bridge_id == b.bridge_id
    for key in ("validation_accuracy", "best_step", "validation_history", "steps", "seed", "lr", "train_rows"):
        assert a.training[key] == b.training[key], key
    diagnostics = lambda d: (d / "diagnostics.jsonl").read_text()  # noqa: E731
    assert diagnostics(trained_with_cli) == diagnostics(again)
    assert (again / RUN_CONFIG_FILE).read_text() == (trained_with_cli / RUN_CONFIG_FILE).read_text()


def test_command_line_options_beat_the_config_file(trained_with_cli, tmp_path):
    out = tmp_path / "over"
    assert cli(["train", "--config", str(trained_with_cli / RUN_CONFIG_FILE), "--steps", "4", "--seed", "1",
                "--eval-every", "2", "--out", str(out), "--no-cache", "--no-progress"]) == 0
    training = read_meta(out).training
    assert training["steps"] == 4 and training["seed"] == 1
    assert [h["step"] for h in training["validation_history"]] == [2, 4]
    written = read_run_config(out / RUN_CONFIG_FILE)
    original = read_run_config(trained_with_cli / RUN_CONFIG_FILE)
    assert {k: v for k, v in written.items() if v != original[k]} == {"steps": 4, "seed": 1, "eval_every": 2}


def test_a_hand_written_config_file(tmp_path):
    """A file names only what it changes; YAML's `3e-3` (a string to YAML 1.1) is read as the number."""
    path = tmp_path / "run.yaml"
    path.write_text("task: trec\nsteps: 2\neval_every: 2\nlr: 3e-3\nbatch_size: 12\n")
    out = tmp_path / "b"
    assert cli(["train", "--config", str(path), "--out", str(out), *TINY_CLI]) == 0
    training = read_meta(out).training
    assert training["lr"] == 0.003 and training["steps"] == 2 and read_meta(out).task == "trec"


def test_bad_config_files_fail_clearly(tmp_path, capsys):
    def error(path: Path, *argv: str) -> str:
        assert cli(["train", "--config", str(path), "--out", str(tmp_path / "out"), *argv]) == 2
        return capsys.readouterr().err.strip()

    bad = tmp_path / "bad.yaml"
    bad.write_text("task: sst2\nstepz: 3\nheads: 4\n")
    assert error(bad) == (
        f"telepathy train: error: --config {bad}: unknown keys 'stepz', 'heads'; known keys: task, sender, receiver, "
        "soft_tokens, d_model, depth, num_heads, d_wire, sender_layer, steps, batch_size, lr, weight_decay, "
        "warmup_steps, min_lr_ratio, grad_clip, diversity_weight, eval_every, checkpoint_every, validation_size, "
        "train_limit, max_text_tokens, seed, device, dtype")
    bad.write_text("task: sst2\nbogus: 1\n")
    assert error(bad, "--task", "trec") == (
        f"telepathy train: error: --config {bad}: unknown key 'bogus'; known keys: task, sender, receiver, "
        "soft_tokens, d_model, depth, num_heads, d_wire, sender_layer, steps, batch_size, lr, weight_decay, "
        "warmup_steps, min_lr_ratio, grad_clip, diversity_weight, eval_every, checkpoint_every, validation_size, "
        "train_limit, max_text_tokens, seed, device, dtype")
    bad.write_text("task: sst2\nlr: fast\n")
    assert error(bad) == f"telepathy train: error: --config {bad}: lr must be a number, got 'fast'"
    bad.write_text("task: sst2\nsteps: true\n")
    assert error(bad) == f"telepathy train: error: --config {bad}: steps must be an integer, got True"
    bad.write_text("task: sst2\ndtype: float16\n")
    assert error(bad) == f"telepathy train: error: --config {bad}: dtype must be one of float32, bfloat16, got 'float16'"
    bad.write_text("steps: 3\n")
    assert error(bad) == "telepathy train: error: --task is required (on the command line or in the --config file)"
    missing = tmp_path / "nope.yaml"
    assert error(missing) == f"telepathy train: error: --config {missing}: No such file or directory"
    assert not (tmp_path / "out").exists()  # nothing written for a refused run
