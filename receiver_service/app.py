"""ReceiverService: the receiver servicer on a GrpcServer, with its batchers and model thread.

    service = build_receiver(ReceiverSettings(...))   # cheap: nothing is loaded yet
    port = await service.start()                     # bind (NOT_SERVING), load model + bridges, warm up, SERVING
    await service.stop()                             # drain: finish in-flight work, end open streams
"""

from __future__ import annotations

from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.runtime.engine import BridgeSet
from telepathy.bridge.runtime.factory import ReceiverRuntime, build_receiver_runtime
from telepathy.config import SettingsError
from telepathy.protos.v1 import receiver_pb2, receiver_pb2_grpc
from telepathy.serving.lifecycle import BaseService, EngineSlot, load_side

from .servicer import ReceiverServicer
from .settings import ReceiverSettings

_ENVELOPE_BYTES = 4096  # protobuf framing, ids, task names and fingerprints around the tensor


class ReceiverService(BaseService):
    name = "receiver"
    service_name = receiver_pb2.DESCRIPTOR.services_by_name["Receiver"].full_name

    def __init__(self, settings: ReceiverSettings, lm: LanguageModel | None = None, tracer_provider=None):
        super().__init__(settings, tracer_provider)
        self._preloaded = lm
        self.runtime: ReceiverRuntime | None = None
        self.engine_slot = EngineSlot(self.name)
        self.soft_tokens = self.batcher("receiver_soft_tokens")
        self.texts = self.batcher("receiver_text")
        self.servicer = ReceiverServicer(settings, self.state, self.metrics, self.engine_slot,
                                         soft_tokens=self.soft_tokens, texts=self.texts,
                                         tracing=self.tracing)
        self.grpc.add_servicer(receiver_pb2_grpc.add_ReceiverServicer_to_server, self.servicer)

    def load(self) -> str:
        lm, bridges = load_side(self.settings, "receiver", self._preloaded, self.state)
        check_message_size(self.settings, bridges)
        self.runtime = build_receiver_runtime(lm, bridges, self.settings.fast_path)
        self.soft_tokens.bind(self.runtime.classify_latents)
        self.texts.bind(self.runtime.classify_text)
        self.engine_slot.fill(self.runtime.engine)
        return lm.spec

    def warmup(self) -> None:
        self.runtime.warmup(self.settings.max_batch_size)

    async def begin_drain(self) -> None:
        self.servicer.drain()


def check_message_size(settings: ReceiverSettings, bridges: BridgeSet) -> None:
    """Refuse to start if a loaded bridge's fp32 soft tokens could not fit in one message."""
    for meta in bridges.metas():
        need = meta.config.num_latents * meta.config.d_wire * 4 + _ENVELOPE_BYTES
        if need > settings.max_message_bytes:
            raise SettingsError(
                f"bridge {meta.bridge_id} sends up to {need} bytes per request (fp32), more than "
                f"--max-message-bytes / TELEPATHY_MAX_MESSAGE_BYTES = {settings.max_message_bytes}"
            )


def build_receiver(settings: ReceiverSettings, lm: LanguageModel | None = None, tracer_provider=None) -> ReceiverService:
    """A receiver for `settings`; `lm` skips loading settings.model (tests share one); `tracer_provider` overrides
    the one settings.tracing builds. Call inside the event loop."""
    return ReceiverService(settings, lm, tracer_provider)
