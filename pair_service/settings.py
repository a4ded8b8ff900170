"""PairSettings: the sender's settings plus the receiver model this process also runs."""

from __future__ import annotations

from telepathy.config import setting
from telepathy.receiver_service.settings import DEFAULT_RECEIVER, ReceiverSettings
from telepathy.sender_service.settings import SenderSettings


class PairSettings(SenderSettings):
    receiver_model: str = setting(DEFAULT_RECEIVER, "pair: the receiver's model spec")
    # Another GPU of the same host keeps both models' weights off one card; the hand-over is then a device copy.
    receiver_device: str = setting("", "pair: the receiver's device (default: --device)")
    # Off: a bridge-path Relay runs as two model calls (sender, then the in-process receiver) with the wire
    # tensor in between, as two services would; for A/B measurements and for bisecting a wrong answer.
    fuse_bridge: bool = setting(True, "pair: run the bridge path as one model call")

    def receiver_settings(self) -> ReceiverSettings:
        """The in-process receiver: every shared setting of this pair, its own model and device."""
        shared = {name: getattr(self, name) for name in ReceiverSettings.model_fields}
        return ReceiverSettings(**{**shared, "model": self.receiver_model, "device": self.receiver_device or self.device})
