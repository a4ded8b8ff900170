"""ReceiverService: the receiver servicer on a GrpcServer, with its batchers and model thread.

    service = build_receiver(ReceiverSettings(...))   # cheap: nothing is loaded yet
    port = await service.start()                     # bind (NOT_SERVING), load model + bridges, warm up, SERVING
    await service.stop()                             # drain: finish in-flight work, end open streams
"""

from __future__ import annotations

from telepathy.bridge.runtime.engine import BridgeSet, ReceiverEngine
from telepathy.bridge.lm import LanguageModel
from telepathy.protos.v1 import receiver_pb2, receiver_pb2_grpc
from telepathy.serving.lifecycle import BaseService
from telepathy.config import SettingsError

from .servicer import ReceiverServicer
from .settings import ReceiverSettings
from .work import ReceiverWork

_ENVELOPE_BYTES = 4096  # protobuf framing, ids, task names and fingerprints around the tensor


class ReceiverService(BaseService):
    name = "receiver"
    service_name = receiver_pb2.DESCRIPTOR.services_by_name["Receiver"].full_name
    bridge_half = "receiver"

    def __init__(self, settings: ReceiverSettings, lm: LanguageModel | None = None, host=None):
        super().__init__(settings, lm, host)
        self.engine: ReceiverEngine | None = None
        self.work: ReceiverWork | None = None
        self.soft_tokens = self.batcher("receiver_soft_tokens", lambda key, items: self.work.classify_latents(key, items))
        self.texts = self.batcher("receiver_text", lambda key, items: self.work.classify_text(key, items))
        self.servicer = ReceiverServicer(self)
        self.grpc.add_servicer(receiver_pb2_grpc.add_ReceiverServicer_to_server, self.servicer)

    def attach(self, lm: LanguageModel, bridges: BridgeSet) -> None:
        _check_message_size(self.settings, bridges)
        self.engine = ReceiverEngine(lm, bridges)
        config = self.fast_path_config(lm)
        if config is not None:
            from telepathy.bridge.runtime.fastpath import ReceiverFastPath

            self.work = ReceiverWork(self.engine, ReceiverFastPath(self.engine, config))
        else:
            self.work = ReceiverWork(self.engine)

    def warmup(self) -> None:
        self.work.warmup(self.settings.max_batch_size)

    async def _begin_drain(self) -> None:
        self.servicer.drain()


def _check_message_size(settings: ReceiverSettings, bridges: BridgeSet) -> None:
    """Refuse to start if a loaded bridge's fp32 soft tokens could not fit in one message."""
    for meta in bridges.metas():
        need = meta.config.num_latents * meta.config.d_wire * 4 + _ENVELOPE_BYTES
        if need > settings.max_message_bytes:
            raise SettingsError(
                f"bridge {meta.bridge_id} sends up to {need} bytes per request (fp32), more than "
                f"--max-message-bytes / TELEPATHY_MAX_MESSAGE_BYTES = {settings.max_message_bytes}"
            )


def build_receiver(settings: ReceiverSettings, lm: LanguageModel | None = None) -> ReceiverService:
    """A receiver for `settings`; `lm` skips loading settings.model (tests share one). Call inside the event loop."""
    return ReceiverService(settings, lm)
