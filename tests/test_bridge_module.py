"""Bridge module: config validation, shapes, padding masks, output norm, determinism."""

from __future__ import annotations

import pytest
import torch

from telepathy.bridge.resampler import Bridge, BridgeConfig, parameter_count, wire_bytes


def test_config_validation_messages():
    with pytest.raises(ValueError, match=r"d_model \(500\) must be divisible by num_heads \(8\)"):
        BridgeConfig(576, 640, d_model=500)
    with pytest.raises(ValueError, match=r"d_wire \(1024\) cannot exceed d_model \(512\)"):
        BridgeConfig(576, 640, d_wire=1024)
    with pytest.raises(ValueError, match="num_latents must be a positive integer"):
        BridgeConfig(576, 640, num_latents=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        BridgeConfig(576, 640, dropout=1.5)
    with pytest.raises(ValueError, match="unknown BridgeConfig fields"):
        BridgeConfig.from_dict({"sender_hidden": 1, "receiver_hidden": 1, "bogus": 3})


def test_default_size_matches_design():
    config = BridgeConfig(576, 640)
    assert 8.5e6 < parameter_count(Bridge(config)) < 9.5e6  # the 9M resampler of the feasibility run
    assert wire_bytes(config, "int8") == 16 * 512 + 16 * 4
    assert wire_bytes(BridgeConfig(576, 640, d_wire=64), "bf16") == 16 * 64 * 2


def test_shapes_and_rms_scale():
    config = BridgeConfig(32, 48, num_latents=5, d_model=32, num_heads=4, d_wire=8, depth=2)
    bridge = Bridge(config, target_rms=0.7)
    states, mask = torch.randn(3, 11, 32), torch.ones(3, 11)
    wire = bridge.encoder(states, mask)
    assert wire.shape == (3, 5, 8)
    soft = bridge.adapter(wire)
    assert soft.shape == (3, 5, 48)
    torch.testing.assert_close(soft.pow(2).mean(-1).sqrt(), torch.full((3, 5), 0.7), rtol=1e-4, atol=1e-4)


def test_padding_is_ignored():
    torch.manual_seed(0)
    config = BridgeConfig(16, 16, num_latents=3, d_model=16, num_heads=2, d_wire=16)
    encoder = Bridge(config).encoder.eval()
    states = torch.randn(1, 6, 16)
    padded = torch.cat([states, torch.randn(1, 4, 16) * 100], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], dim=1)
    torch.testing.assert_close(encoder(states, torch.ones(1, 6)), encoder(padded, mask), rtol=1e-5, atol=1e-5)


def test_deterministic_under_seed():
    def build():
        torch.manual_seed(42)
        return Bridge(BridgeConfig(16, 16, num_latents=3, d_model=16, num_heads=2, d_wire=16))

    x, m = torch.randn(2, 5, 16), torch.ones(2, 5)
    torch.testing.assert_close(build()(x, m), build()(x, m))
