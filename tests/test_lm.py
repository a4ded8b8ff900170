"""LanguageModel wrapper on the tiny random pair: buckets, truncated stacks, label scoring, fingerprints."""

from __future__ import annotations

import pytest
import torch

from telepathy.bridge.lm import LanguageModel, length_bucket
from telepathy.bridge.models import ModelSpecError, load_model
from telepathy.bridge.tasks import TASKS, UnknownTaskError, get_task


def test_length_buckets():
    assert [length_bucket(n, 256) for n in (1, 16, 17, 33, 200, 300)] == [16, 16, 32, 64, 256, 256]


def test_tokenize_right_pads_to_bucket(tiny_sender):
    ids, mask = tiny_sender.tokenize(["the world news today", "sports"])
    assert ids.shape == mask.shape == (2, 16)
    assert mask[0].tolist()[:6] == [1, 1, 1, 1, 1, 0] and mask[1].sum() == 2
    assert (ids[mask == 0] == tiny_sender.tokenizer.pad_token_id).all()


def test_hidden_states_stop_at_layer_and_skip_norm(tiny_sender):
    ids, mask = tiny_sender.tokenize(["a question about the world"])
    full = tiny_sender.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for layer in (1, 2, 3):
        torch.testing.assert_close(tiny_sender.hidden_states(ids, mask, layer), full[layer])
    # HF's last entry is after the final norm; ours is the raw output of the last layer
    top = tiny_sender.hidden_states(ids, mask, tiny_sender.num_layers)
    torch.testing.assert_close(tiny_sender.backbone.norm(top), full[-1])
    with pytest.raises(ValueError, match="layer must be in 1..4, got 5"):
        tiny_sender.hidden_states(ids, mask, 5)


def test_real_tokens_do_not_see_padding(tiny_sender):
    ids, mask = tiny_sender.tokenize(["what is the capital of france"], bucket=False)
    padded_ids, padded_mask = tiny_sender.tokenize(["what is the capital of france"], max_length=64)
    n = int(mask.sum())
    torch.testing.assert_close(
        tiny_sender.hidden_states(ids, mask, 3)[:, :n], tiny_sender.hidden_states(padded_ids, padded_mask, 3)[:, :n],
        rtol=1e-5, atol=1e-5,
    )


def test_label_logits_match_full_forward(tiny_receiver):
    label_ids = tiny_receiver.label_token_ids(TASKS["ag_news"].verbalizers)
    prompts = ["topic : world", "a much longer prompt about sports and business"]
    ids, mask = tiny_receiver.tokenize(prompts)
    got = tiny_receiver.label_logits(tiny_receiver.embed(ids), mask, label_ids)
    full = tiny_receiver.model(input_ids=ids, attention_mask=mask).logits.float()
    last = mask.sum(1) - 1
    want = full[torch.arange(2), last][:, label_ids]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_verbalizers_must_have_distinct_first_tokens(tiny_receiver):
    with pytest.raises(ValueError, match="share first tokens"):
        tiny_receiver.label_token_ids([" world", " world"])


def test_embedding_rms_includes_gemma_scale(tiny_receiver):
    emb = tiny_receiver.model.get_input_embeddings()
    plain = float(emb.weight.pow(2).mean(-1).sqrt().median())
    assert tiny_receiver.embedding_rms_median() == pytest.approx(plain * tiny_receiver.hidden_size**0.5, rel=1e-4)


def test_fingerprints_are_stable_and_distinct(tiny_sender, tiny_receiver):
    again = LanguageModel.load("random:tiny-llama")
    assert again.fingerprint() == tiny_sender.fingerprint()
    assert tiny_sender.fingerprint().digest != tiny_receiver.fingerprint().digest
    # same name → same random weights in every process
    torch.testing.assert_close(again.model.lm_head.weight, tiny_sender.model.lm_head.weight)


def test_generate_is_greedy_and_deterministic(tiny_sender):
    a = tiny_sender.generate(["say something about sports"], max_new_tokens=5)
    assert a == tiny_sender.generate(["say something about sports"], max_new_tokens=5) and isinstance(a[0], str)


def test_bad_specs():
    with pytest.raises(ModelSpecError, match="unknown random preset 'nope'"):
        load_model("random:nope")
    with pytest.raises(ModelSpecError, match="GGUF file not found"):
        load_model("/does/not/exist.gguf")
    with pytest.raises(ModelSpecError, match="cannot resolve model spec"):
        load_model("definitely not a model")


def test_unknown_task():
    with pytest.raises(UnknownTaskError) as err:
        get_task("imdb")
    assert str(err.value) == "unknown task 'imdb'; known tasks: ag_news, sst2, trec"
