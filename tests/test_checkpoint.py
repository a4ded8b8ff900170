"""Checkpoints: save/load round trip, fingerprints, and every kind of bad file → a clear CheckpointError."""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from telepathy.bridge.checkpoint import (
    CheckpointError,
    FingerprintMismatch,
    find_bridges,
    load_adapter,
    load_bridge,
    load_encoder,
    read_meta,
    save_bridge,
)
from telepathy.bridge.resampler import Bridge, BridgeConfig
from telepathy.bridge.tasks import get_task


@pytest.fixture()
def saved(tmp_path, tiny_sender, tiny_receiver):
    torch.manual_seed(3)
    config = BridgeConfig(tiny_sender.hidden_size, tiny_receiver.hidden_size, sender_layer=2, num_latents=4,
                          d_model=32, num_heads=4, d_wire=16, depth=1)
    bridge = Bridge(config, target_rms=tiny_receiver.embedding_rms_median())
    meta = save_bridge(tmp_path / "b", bridge, get_task("trec"), tiny_sender.fingerprint(), tiny_receiver.fingerprint(),
                       training={"steps": 5})
    return bridge, meta


def test_round_trip(saved, tiny_sender, tiny_receiver):
    bridge, meta = saved
    assert sorted(p.name for p in meta.path.iterdir()) == ["config.json", "model.safetensors"]
    loaded, meta2 = load_bridge(meta.path, tiny_sender.fingerprint(), tiny_receiver.fingerprint())
    assert meta2.fingerprint == meta.fingerprint and meta2.labels == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    x, m = torch.randn(2, 7, tiny_sender.hidden_size), torch.ones(2, 7)
    torch.testing.assert_close(loaded.eval()(x, m), bridge.eval()(x, m))
    encoder, _ = load_encoder(meta.path, tiny_sender.fingerprint())
    adapter, _ = load_adapter(meta.path, tiny_receiver.fingerprint())
    torch.testing.assert_close(adapter(encoder(x, m)), loaded(x, m))
    raw = json.loads((meta.path / "config.json").read_text())
    assert raw["sender"]["digest"] == tiny_sender.fingerprint().digest and raw["training"] == {"steps": 5}
    assert find_bridges(meta.path.parent) == [meta.path]


def test_find_bridges_skips_a_runs_resumable_checkpoints(saved, tmp_path):
    """A run folder keeps its last resumable checkpoint under checkpoints/: training state, not a second bridge."""
    _, meta = saved
    run = tmp_path / "run"
    shutil.copytree(meta.path, run)
    shutil.copytree(meta.path, run / "checkpoints" / "step_5")
    (run / "checkpoints" / "step_5" / "trainer_state.json").write_text("{}")
    assert find_bridges(run) == [run]
    assert find_bridges(run / "checkpoints" / "step_5") == [run / "checkpoints" / "step_5"]  # asked for itself


def test_wrong_receiver_names_both_fingerprints(saved, tiny_sender, tiny_receiver):
    _, meta = saved
    other = replace(tiny_receiver.fingerprint(), spec="random:other", hidden_size=123)
    with pytest.raises(FingerprintMismatch) as err:
        load_adapter(meta.path, other)
    msg = str(err.value)
    assert "trained for receiver random:tiny-gemma" in msg and tiny_receiver.fingerprint().digest in msg
    assert "but the loaded receiver is random:other" in msg and other.digest in msg


def test_wrong_sender_is_refused(saved, tiny_receiver):
    _, meta = saved
    with pytest.raises(FingerprintMismatch, match="trained for sender random:tiny-llama"):
        load_encoder(meta.path, tiny_receiver.fingerprint())


def test_truncated_weights(saved):
    _, meta = saved
    weights = meta.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="does not match config.json"):
        load_bridge(meta.path)


def test_truncated_weights_with_matching_hash_is_unreadable(saved):
    _, meta = saved
    weights = meta.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _rehash(meta.path)
    with pytest.raises(CheckpointError, match="unreadable safetensors file"):
        load_bridge(meta.path)


def _rehash(path):
    import hashlib

    raw = json.loads((path / "config.json").read_text())
    raw["weights_sha256"] = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    (path / "config.json").write_text(json.dumps(raw))


def test_missing_and_misshapen_tensors(saved):
    bridge, meta = saved
    state = {k: v.detach().clone() for k, v in bridge.state_dict().items()}
    del state["encoder.latents"]
    save_file(state, str(meta.path / "model.safetensors"))
    _rehash(meta.path)
    with pytest.raises(CheckpointError, match=r"missing tensors \['encoder.latents'\]"):
        load_bridge(meta.path)
    state["encoder.latents"] = torch.zeros(9, 32)
    save_file(state, str(meta.path / "model.safetensors"))
    _rehash(meta.path)
    with pytest.raises(CheckpointError, match=r"tensor latents has shape \[9, 32\], config.json implies \[4, 32\]"):
        load_encoder(meta.path)


def test_bad_config_files(tmp_path, saved):
    _, meta = saved
    with pytest.raises(CheckpointError, match="no config.json"):
        read_meta(tmp_path)
    cfg = meta.path / "config.json"
    raw = json.loads(cfg.read_text())
    cfg.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_meta(meta.path)
    cfg.write_text(json.dumps({**raw, "format": "pickle"}))
    with pytest.raises(CheckpointError, match="format is not 'telepathy-bridge'"):
        read_meta(meta.path)
    broken = dict(raw)
    del broken["receiver"]
    cfg.write_text(json.dumps(broken))
    with pytest.raises(CheckpointError, match="missing or invalid field"):
        read_meta(meta.path)
    cfg.write_text(json.dumps({**raw, "bridge": {**raw["bridge"], "d_model": 30}}))
    with pytest.raises(CheckpointError, match="must be divisible by num_heads"):
        read_meta(meta.path)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_checkpoint_files_get_normal_permissions(tmp_path, tiny_sender, tiny_receiver, umask):
    """0666 minus the umask, like any file the user writes (0644 under the usual 022): a 0600 model.safetensors
    could not be read by the container images' non-root user."""
    config = BridgeConfig(tiny_sender.hidden_size, tiny_receiver.hidden_size, sender_layer=2, num_latents=4,
                          d_model=32, num_heads=4, d_wire=16, depth=1)
    previous = os.umask(umask)
    try:
        meta = save_bridge(tmp_path / "b", Bridge(config), get_task("sst2"), tiny_sender.fingerprint(), tiny_receiver.fingerprint())
    finally:
        os.umask(previous)
    assert sorted(p.name for p in meta.path.iterdir()) == ["config.json", "model.safetensors"]  # no temp file left
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((meta.path / name).stat().st_mode) == 0o666 & ~umask, name
