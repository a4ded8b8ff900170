"""SenderService: the sender servicer on a GrpcServer, with its batchers, model thread and receiver link.

    service = build_sender(SenderSettings(...))   # cheap: nothing is loaded yet
    port = await service.start()                 # bind (NOT_SERVING), load, open the receiver stream, warm up
    await service.stop()                         # drain: finish in-flight relays, then close the stream
"""

from __future__ import annotations

from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.runtime.factory import SenderRuntime, build_sender_runtime
from telepathy.protos.v1 import sender_pb2, sender_pb2_grpc
from telepathy.serving.lifecycle import BaseService, EngineSlot, load_side

from .link import ReceiverPool
from .servicer import SenderServicer
from .settings import SenderSettings


class SenderService(BaseService):
    name = "sender"
    service_name = sender_pb2.DESCRIPTOR.services_by_name["Sender"].full_name

    def __init__(self, settings: SenderSettings, lm: LanguageModel | None = None, tracer_provider=None):
        super().__init__(settings, tracer_provider)
        self._preloaded = lm
        self.runtime: SenderRuntime | None = None
        self.engine_slot = EngineSlot(self.name)
        self.encoder = self.batcher("sender_encode")
        self.generator = self.batcher("sender_generate")
        self.link = ReceiverPool(settings.receiver_addr, settings.receiver_client(), self.metrics,
                                 streams=settings.receiver_streams, wait_s=settings.receiver_wait_s)
        self.servicer = SenderServicer(settings, self.state, self.metrics, self.engine_slot,
                                       encoder=self.encoder, generator=self.generator, link=self.link,
                                       tracing=self.tracing)
        self.grpc.add_servicer(sender_pb2_grpc.add_SenderServicer_to_server, self.servicer)

    def load(self) -> str:
        lm, bridges = load_side(self.settings, "sender", self._preloaded, self.state)
        self.runtime = build_sender_runtime(lm, bridges, self.settings.fast_path)
        self.encoder.bind(self.runtime.encode)
        self.generator.bind(self.runtime.generate, stoppable=True)
        self.engine_slot.fill(self.runtime.engine)
        return lm.spec

    def warmup(self) -> None:
        self.runtime.warmup(self.settings.max_batch_size, self.settings.wire_dtype)

    async def after_load(self) -> None:
        await self.link.start()

    async def after_stop(self) -> None:
        await self.link.close()


def build_sender(settings: SenderSettings, lm: LanguageModel | None = None, tracer_provider=None) -> SenderService:
    """A sender for `settings`; `lm` skips loading settings.model (tests share one); `tracer_provider` overrides
    the one settings.tracing builds (serving/tracing.py). Call inside the event loop."""
    return SenderService(settings, lm, tracer_provider)
