"""Engines in-process on the tiny pair: the bridge path across a real wire, the text path, bridge lookup."""

from __future__ import annotations

import pytest
import torch

from telepathy.bridge.codec import decode_batch
from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.runtime.engine import BridgeNotFoundError, ReceiverEngine, SenderEngine, load_bridge_set
from telepathy.bridge.tasks import UnknownTaskError
from tests.conftest import make_tiny_bridges


@pytest.fixture(scope="module")
def engines(tiny_sender, tiny_receiver, tiny_bridges_dir):
    sender = SenderEngine(tiny_sender, load_bridge_set(tiny_bridges_dir, tiny_sender, "sender", "cpu"))
    receiver = ReceiverEngine(tiny_receiver, load_bridge_set(tiny_bridges_dir, tiny_receiver, "receiver", "cpu"))
    return sender, receiver


def test_bridge_path_over_the_wire_matches_in_process(engines):
    sender, receiver = engines
    texts = ["the team won the final", "stocks fell on monday", "what is the capital of france ?"]
    latents, meta = sender.encode(texts, "ag_news")
    assert latents.shape == (3, 4, 16)
    direct, _ = receiver.classify_latents(latents, "ag_news")
    wire, _ = sender.encode_wire(texts, "ag_news", "fp32")
    over_wire, _ = receiver.classify_latents(decode_batch(wire), "ag_news")
    torch.testing.assert_close(direct, over_wire)
    assert direct.shape == (3, 4)
    torch.testing.assert_close(direct.sum(-1), torch.ones(3))
    int8, _ = receiver.classify_latents(decode_batch(sender.encode_wire(texts, "ag_news", "int8")[0]), "ag_news")
    assert (int8 - direct).abs().max() < 0.02


def test_batching_does_not_change_answers(engines):
    sender, receiver = engines
    texts = ["a short one", "a much longer text about the world cup and the economy of europe"]
    both, _ = receiver.classify_latents(sender.encode(texts, "sst2")[0], "sst2")
    for i, t in enumerate(texts):
        alone, _ = receiver.classify_latents(sender.encode([t], "sst2")[0], "sst2")
        torch.testing.assert_close(alone[0], both[i], rtol=1e-4, atol=1e-5)


def test_receiver_input_layout(engines, tiny_receiver):
    _, receiver = engines
    bridge = receiver.bridges.resolve("trec")
    soft = torch.randn(2, 4, tiny_receiver.hidden_size)
    embeds, mask = receiver.soft_inputs(bridge.meta, soft)
    primer = tiny_receiver.embed_text("Answer type:")
    assert embeds.shape == (2, primer.shape[0] + 4, tiny_receiver.hidden_size) and mask.all()
    torch.testing.assert_close(embeds[0, : primer.shape[0]], primer)
    torch.testing.assert_close(embeds[:, primer.shape[0]:], soft)


def test_text_path(engines):
    sender, receiver = engines
    relay = sender.relay(["the match ended in a draw"], "ag_news", max_tokens=6)
    probs = receiver.classify_text(relay, "ag_news")
    assert probs.shape == (1, 4) and torch.isclose(probs.sum(), torch.tensor(1.0))


def test_lookup_errors(engines, tiny_bridges_dir):
    sender, _ = engines
    with pytest.raises(UnknownTaskError):
        sender.encode(["x"], "imdb")
    with pytest.raises(BridgeNotFoundError, match="no bridge with id 'nope' is loaded"):
        sender.encode(["x"], "trec", bridge_id="nope")
    ag_id = sender.bridges.resolve("ag_news").meta.bridge_id
    with pytest.raises(BridgeNotFoundError, match=f"bridge '{ag_id}' is for task 'ag_news', not 'trec'"):
        sender.encode(["x"], "trec", bridge_id=ag_id)


def test_bridges_for_other_models_are_skipped(tmp_path, tiny_sender, tiny_receiver, caplog):
    make_tiny_bridges(tmp_path, tiny_sender, tiny_receiver, tasks=("sst2",))
    other = LanguageModel.load("random:tiny-gemma")
    other._fingerprint = None
    # the tiny sender plays "another receiver": its fingerprint does not match the bridges' receiver
    bridges = load_bridge_set(tmp_path, tiny_sender, "receiver", "cpu")
    assert len(bridges) == 0 and "skipping bridge" in caplog.text
    with pytest.raises(BridgeNotFoundError, match="no bridge is loaded for task 'sst2'; loaded tasks: \\[\\]"):
        bridges.resolve("sst2")
    assert len(load_bridge_set(tmp_path, other, "receiver", "cpu")) == 1
