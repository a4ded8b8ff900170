"""Shared fixtures: the tiny random model pair and untrained (but real, saved) bridges for it.

Tiny models are real transformers models (Llama and Gemma3 architectures) with random weights and a
word-level tokenizer, so tests exercise every real code path in seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from telepathy.bridge.checkpoint import save_bridge
from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.models import TINY_RECEIVER, TINY_SENDER
from telepathy.bridge.resampler import Bridge, BridgeConfig
from telepathy.bridge.tasks import TASKS, get_task

TINY_BRIDGE = dict(sender_layer=2, num_latents=4, d_model=32, depth=1, num_heads=4, d_wire=16)


@pytest.fixture(scope="session")
def tiny_sender() -> LanguageModel:
    return LanguageModel.load(TINY_SENDER)


@pytest.fixture(scope="session")
def tiny_receiver() -> LanguageModel:
    return LanguageModel.load(TINY_RECEIVER)


def make_tiny_bridges(root: Path, sender: LanguageModel, receiver: LanguageModel, tasks=tuple(TASKS)) -> Path:
    """One untrained bridge per task (a built-in name or a TaskSpec) for the tiny pair, saved as real checkpoints
    under root/<task>."""
    for i, task in enumerate(tasks):
        spec = get_task(task) if isinstance(task, str) else task
        torch.manual_seed(1000 + i)
        config = BridgeConfig(sender_hidden=sender.hidden_size, receiver_hidden=receiver.hidden_size, **TINY_BRIDGE)
        bridge = Bridge(config, target_rms=receiver.embedding_rms_median())
        save_bridge(root / spec.name, bridge, spec, sender.fingerprint(), receiver.fingerprint(),
                    training={"steps": 0})
    return root


@pytest.fixture(scope="session")
def tiny_bridges_dir(tmp_path_factory, tiny_sender, tiny_receiver) -> Path:
    return make_tiny_bridges(tmp_path_factory.mktemp("bridges"), tiny_sender, tiny_receiver)
