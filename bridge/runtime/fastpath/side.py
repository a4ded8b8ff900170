"""What both sides of the fast path hold: `_FastSide`, the base of SenderFastPath and ReceiverFastPath."""

from __future__ import annotations

import threading

from telepathy.bridge.runtime.engine import ReceiverEngine, SenderEngine
from telepathy.bridge.runtime.fastpath.config import FastPathConfig, _check_dtype
from telepathy.bridge.runtime.fastpath.graphs import _RunnerCache


class _FastSide:
    """What both sides hold: the engine and its model, the config, the runners of their static shapes, one lock."""

    def __init__(self, engine: SenderEngine | ReceiverEngine, config: FastPathConfig | None = None):
        self.engine, self.lm = engine, engine.lm
        self.config = config or FastPathConfig()
        self.device = self.lm.device
        _check_dtype(self.lm, self.config)
        self.pad_id = int(self.lm.tokenizer.pad_token_id)
        self._runners = _RunnerCache(self.device, self.config)
        self._lock = threading.Lock()
