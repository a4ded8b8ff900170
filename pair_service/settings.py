"""PairSettings: the sender's settings plus the receiver model this process also runs."""

from __future__ import annotations

from dataclasses import dataclass, fields

from telepathy.receiver_service.settings import DEFAULT_RECEIVER, ReceiverSettings
from telepathy.config import env_field
from telepathy.sender_service.settings import SenderSettings


@dataclass
class PairSettings(SenderSettings):
    receiver_model: str = env_field(DEFAULT_RECEIVER, "TELEPATHY_RECEIVER_MODEL", "pair: the receiver's model spec")
    # Another GPU of the same host keeps both models' weights off one card; the hand-over is then a device copy.
    receiver_device: str = env_field("", "TELEPATHY_RECEIVER_DEVICE", "pair: the receiver's device (default: --device)")
    # Off: a bridge-path Relay runs as two model calls (sender, then the in-process receiver) with the wire
    # tensor in between, as two services would; for A/B measurements and for bisecting a wrong answer.
    fuse_bridge: bool = env_field(True, "TELEPATHY_FUSE_BRIDGE", "pair: run the bridge path as one model call")

    def receiver_settings(self) -> ReceiverSettings:
        """The in-process receiver: every shared setting of this pair, its own model and device."""
        shared = {f.name: getattr(self, f.name) for f in fields(ReceiverSettings)}
        return ReceiverSettings(**{**shared, "model": self.receiver_model, "device": self.receiver_device or self.device})
