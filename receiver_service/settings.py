"""ReceiverSettings: ServiceSettings with the receiver's port and model defaults."""

from __future__ import annotations

from dataclasses import dataclass

from telepathy.contract import DEFAULT_RECEIVER
from telepathy.config import ServiceSettings, env_field



@dataclass
class ReceiverSettings(ServiceSettings):
    port: int = env_field(50052, "TELEPATHY_PORT", "gRPC port (0 = pick a free one)")
    model: str = env_field(DEFAULT_RECEIVER, "TELEPATHY_MODEL", "model spec: embedded preset, random:NAME, .gguf file, folder, HF id")
