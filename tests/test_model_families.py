"""Every ordered pair of four tiny model families (Llama, Gemma3, Qwen2, Mistral), in both directions.

Each family is a `random:tiny-*` preset: a real transformers architecture built from a config with random weights
and the tiny word-level tokenizer, each with its own hidden size so that a shape bug cannot hide. For each pair
(sender A → receiver B, A ≠ B): train a bridge a few steps with the training loop `telepathy train` runs, save the
checkpoint, load it back, check the fingerprints (the right pair loads; any other model is refused with the
project's FingerprintMismatch message), and classify through the serving engines and `bridge.classify`, which give
the in-memory bridge's probabilities. `telepathy train` and `telepathy classify` themselves run once per pair too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from telepathy.bridge.checkpoint import FingerprintMismatch, load_adapter, load_bridge, load_encoder, read_meta
from telepathy.bridge.classify import Classifier
from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.runtime.engine import BridgeSet, LoadedBridge, ReceiverEngine, SenderEngine, load_bridge_set
from telepathy.bridge.tasks import get_task
from telepathy.bridge.training.config import default_sender_layer
from telepathy.bridge.training.data import load_split
from telepathy.bridge.training.hidden_cache import StatesStore
from telepathy.bridge.training.train import TrainConfig, make_bridge_runs, train_jointly
from telepathy.cli import main as cli

FAMILIES = {  # family → (spec, transformers class)
    "llama": ("random:tiny-llama", "LlamaForCausalLM"),
    "gemma": ("random:tiny-gemma", "Gemma3ForCausalLM"),
    "qwen2": ("random:tiny-qwen2", "Qwen2ForCausalLM"),
    "mistral": ("random:tiny-mistral", "MistralForCausalLM"),
}
PAIRS = [(a, b) for a in FAMILIES for b in FAMILIES if a != b]  # 12 ordered pairs: both directions of each
TASK = "trec"  # 6 labels: probabilities [B, 6]
STEPS = 3
SMALL = dict(soft_tokens=4, d_model=32, num_heads=4, d_wire=16, batch_size=6, validation_size=6, train_limit=12,
             warmup_steps=1, lr=3e-3, eval_every=STEPS, checkpoint_every=STEPS, steps=STEPS)
SMALL_CLI = ["--soft-tokens", "4", "--d-model", "32", "--heads", "4", "--d-wire", "16", "--batch-size", "6",
             "--validation-size", "6", "--train-limit", "12", "--warmup", "1", "--lr", "0.003", "--eval-every", str(STEPS),
             "--checkpoint-every", str(STEPS), "--steps", str(STEPS), "--no-cache", "--no-progress", "--device", "cpu"]
TEXTS = [r.text for r in load_split(TASK, "test", limit=5)]


@pytest.fixture(scope="module")
def lms() -> dict[str, LanguageModel]:
    """One loaded model per family, shared by every pair (each plays sender and receiver)."""
    return {family: LanguageModel.load(spec) for family, (spec, _) in FAMILIES.items()}


class Trained:
    def __init__(self, sender: str, receiver: str, run, meta, out: Path, store: StatesStore, initial: dict):
        self.sender, self.receiver, self.run, self.meta, self.out, self.store = sender, receiver, run, meta, out, store
        self.initial = initial  # the bridge's weights before training


@pytest.fixture(scope="module", params=PAIRS, ids=[f"{a}-to-{b}" for a, b in PAIRS])
def trained(request, lms, tmp_path_factory) -> Trained:
    """A bridge trained STEPS steps for one ordered pair, saved (fp32 weights, so loading is exact)."""
    a, b = request.param
    out = tmp_path_factory.mktemp(f"{a}-to-{b}") / "bridge"
    config = TrainConfig(task=TASK, sender=FAMILIES[a][0], receiver=FAMILIES[b][0], **SMALL)
    store = StatesStore()
    (run,) = make_bridge_runs([config], lms[a], lms[b], [out], store)
    initial = {k: v.detach().clone() for k, v in run.module.state_dict().items()}
    train_jointly([run], STEPS, progress=False)
    meta = run.save_final(out, dtype=torch.float32)
    return Trained(a, b, run, meta, out, store, initial)


def _mismatch(meta, role: str, live: LanguageModel) -> str:
    """The message checkpoint.check_fingerprint raises for a model the bridge was not trained for."""
    expected = meta.sender if role == "sender" else meta.receiver
    return (f"bridge {meta.path} was trained for {role} {expected.describe()}, "
            f"but the loaded {role} is {live.fingerprint().describe()}")


# ------------------------------------------------------------------------------------------------ the families


def test_families_are_distinct_real_architectures(lms):
    fps = {f: lm.fingerprint() for f, lm in lms.items()}
    assert {f: fp.architecture for f, fp in fps.items()} == {f: cls for f, (_, cls) in FAMILIES.items()}
    assert len({fp.hidden_size for fp in fps.values()}) == len(FAMILIES)  # a mixed-up width fails a shape check
    assert len({fp.digest for fp in fps.values()}) == len(FAMILIES)
    assert len({fp.vocab_hash for fp in fps.values()}) == 1  # one tokenizer: only the architecture tells them apart
    again = LanguageModel.load(FAMILIES["qwen2"][0])  # same preset → same weights and fingerprint in any process
    assert again.fingerprint() == fps["qwen2"]
    assert all(torch.equal(p, q) for p, q in zip(again.model.parameters(), lms["qwen2"].model.parameters()))


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_reads_each_family_like_transformers(lms, family):
    """LanguageModel's shortcuts (truncated decoder stack, last-position label logits) agree with the full model."""
    lm = lms[family]
    ids, mask = lm.tokenize(["what is the capital of france ?", "the team won"])
    real = mask.bool()
    with torch.no_grad():
        out = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        for layer in range(1, lm.num_layers):  # hidden_states[num_layers] is after the final norm
            ours = lm.hidden_states(ids, mask, layer)
            assert ours.shape == (2, ids.shape[1], lm.hidden_size)
            torch.testing.assert_close(ours[real], out.hidden_states[layer][real], rtol=1e-4, atol=1e-5)
        labels = lm.label_token_ids(get_task(TASK).verbalizers)
        ours = lm.label_logits(lm.embed(ids), mask, labels)
    last = mask.sum(1) - 1
    torch.testing.assert_close(ours, out.logits[torch.arange(2), last][:, labels].float(), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ every pair


def test_pair_trains_and_checkpoints(trained, lms):
    sender, receiver, meta = lms[trained.sender], lms[trained.receiver], trained.meta
    rows = [json.loads(line) for line in (trained.out / "diagnostics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert meta.training["steps"] == STEPS and meta.training["best_step"] == STEPS
    assert (meta.training["sender"], meta.training["receiver"]) == (sender.spec, receiver.spec)
    c = meta.config
    assert (c.sender_hidden, c.receiver_hidden) == (sender.hidden_size, receiver.hidden_size)
    assert c.sender_layer == default_sender_layer(sender.num_layers)
    assert (meta.sender, meta.receiver) == (sender.fingerprint(), receiver.fingerprint())
    assert (trained.out / "checkpoints" / f"step_{STEPS:06d}" / "trainer_state.json").is_file()
    on_disk = read_meta(trained.out)
    assert on_disk.fingerprint == meta.fingerprint and on_disk.bridge_id == meta.bridge_id
    bridge, _ = load_bridge(trained.out, sender.fingerprint(), receiver.fingerprint())
    saved, live = bridge.state_dict(), trained.run.module.state_dict()
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)
    assert not all(torch.equal(saved[k], trained.initial[k]) for k in saved)  # the steps moved the weights


def test_pair_fingerprint_check(trained, lms):
    """The right pair loads; every other model, the reversed pair included, is refused with the exact message."""
    out, meta = trained.out, trained.meta
    sender, receiver = lms[trained.sender], lms[trained.receiver]
    load_encoder(out, sender.fingerprint())
    load_adapter(out, receiver.fingerprint())
    for family, lm in lms.items():
        if family != trained.receiver:
            with pytest.raises(FingerprintMismatch) as exc:
                load_adapter(out, lm.fingerprint())
            assert str(exc.value) == _mismatch(meta, "receiver", lm)
            with pytest.raises(FingerprintMismatch) as exc:
                load_bridge(out, sender.fingerprint(), lm.fingerprint())
            assert str(exc.value) == _mismatch(meta, "receiver", lm)
            assert len(load_bridge_set(out, lm, "receiver", "cpu")) == 0  # a service skips it
        if family != trained.sender:
            with pytest.raises(FingerprintMismatch) as exc:
                load_encoder(out, lm.fingerprint())
            assert str(exc.value) == _mismatch(meta, "sender", lm)
            assert len(load_bridge_set(out, lm, "sender", "cpu")) == 0
    wrong = lms[next(f for f in FAMILIES if f not in (trained.sender, trained.receiver))]
    with pytest.raises(FingerprintMismatch) as exc:
        Classifier(sender, wrong, [out])
    assert str(exc.value) == _mismatch(meta, "receiver", wrong)
    with pytest.raises(FingerprintMismatch) as exc:  # the same bridge the other way round
        Classifier(receiver, sender, [out])
    assert str(exc.value) == _mismatch(meta, "sender", receiver)


def test_pair_classifies_like_the_in_memory_bridge(trained, lms):
    sender, receiver, meta, run = lms[trained.sender], lms[trained.receiver], trained.meta, trained.run
    n, labels = len(TEXTS), get_task(TASK).num_labels
    # loaded from disk, through the engines the services run
    s_engine = SenderEngine(sender, load_bridge_set(trained.out, sender, "sender", "cpu"))
    r_engine = ReceiverEngine(receiver, load_bridge_set(trained.out, receiver, "receiver", "cpu"))
    latents, used = s_engine.encode(TEXTS, TASK)
    assert used.bridge_id == meta.bridge_id and latents.shape == (n, meta.config.num_latents, meta.config.d_wire)
    probs, _ = r_engine.classify_latents(latents, TASK)
    assert probs.shape == (n, labels) and probs.dtype == torch.float32 and bool((probs >= 0).all())
    torch.testing.assert_close(probs.sum(-1), torch.ones(n), rtol=0, atol=1e-5)
    # the in-memory bridge (the trained module, never saved) through the same engines: the same numbers
    module = run.module.eval()
    mem_s = SenderEngine(sender, BridgeSet([LoadedBridge(meta, module.encoder)]))
    mem_r = ReceiverEngine(receiver, BridgeSet([LoadedBridge(meta, module.adapter)]))
    mem_latents, _ = mem_s.encode(TEXTS, TASK)
    assert torch.equal(latents, mem_latents)
    assert torch.equal(probs, mem_r.classify_latents(mem_latents, TASK)[0])
    # and the trainer's own prediction (cached sender states, training layout)
    states = trained.store.get(sender, TEXTS, meta.config.sender_layer)
    torch.testing.assert_close(probs, run.predict(states, n).exp(), rtol=1e-4, atol=1e-5)
    # bridge.classify (`telepathy classify`): fp32 on the wire is lossless; int8 (the default) still sums to 1
    exact, _, nbytes = Classifier(sender, receiver, [trained.out], wire_dtype="fp32").classify(TEXTS, TASK)
    torch.testing.assert_close(exact, probs, rtol=1e-5, atol=1e-6)
    assert nbytes == 4 * meta.config.num_latents * meta.config.d_wire
    coarse, _, _ = Classifier(sender, receiver, [trained.out]).classify(TEXTS, TASK)
    assert coarse.shape == (n, labels)
    torch.testing.assert_close(coarse.sum(-1), torch.ones(n), rtol=0, atol=1e-5)


def test_pair_through_the_cli(trained, lms, tmp_path, capsys):
    """`telepathy train` (models loaded by spec, afresh) trains the same bridge; `telepathy classify --bridge` reads
    the pair from it and answers with probabilities over the task's labels."""
    out = tmp_path / "cli"
    sender_spec, receiver_spec = FAMILIES[trained.sender][0], FAMILIES[trained.receiver][0]
    argv = ["train", "--task", TASK, "--sender", sender_spec, "--receiver", receiver_spec, "--out", str(out)]
    assert cli([*argv, *SMALL_CLI]) == 0
    assert f"saved bridge {TASK}-" in capsys.readouterr().out
    bridge, meta = load_bridge(out, lms[trained.sender].fingerprint(), lms[trained.receiver].fingerprint())
    assert (meta.sender, meta.receiver) == (trained.meta.sender, trained.meta.receiver)
    expected = trained.run.module.state_dict()  # the CLI stores bf16 weights; training itself is the same
    assert all(torch.equal(v, expected[k].to(torch.bfloat16).float()) for k, v in bridge.state_dict().items())

    assert cli(["classify", "--task", TASK, "--bridge", str(out), "--json", "--device", "cpu", TEXTS[0]]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert (answer["sender"], answer["receiver"], answer["bridge_id"]) == (sender_spec, receiver_spec, meta.bridge_id)
    assert list(answer["scores"]) == list(get_task(TASK).labels)
    assert sum(answer["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    assert answer["label"] == max(answer["scores"], key=answer["scores"].get)
