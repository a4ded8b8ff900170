"""ReceiverSettings: ServiceSettings with the receiver's port and model defaults."""

from __future__ import annotations

from telepathy.config import ServiceSettings, setting
from telepathy.contract import DEFAULT_RECEIVER


class ReceiverSettings(ServiceSettings):
    port: int = setting(50052, "gRPC port (0 = pick a free one)")
    model: str = setting(DEFAULT_RECEIVER, "model spec: embedded preset, random:NAME, .gguf file, folder, HF id")
