"""SenderService: the sender servicer on a GrpcServer, with its batchers, model thread and receiver link.

    service = build_sender(SenderSettings(...))   # cheap: nothing is loaded yet
    port = await service.start()                 # bind (NOT_SERVING), load, open the receiver stream, warm up
    await service.stop()                         # drain: finish in-flight relays, then close the stream
"""

from __future__ import annotations

from telepathy.bridge.runtime.engine import BridgeSet, SenderEngine
from telepathy.bridge.lm import LanguageModel
from telepathy.protos.v1 import sender_pb2, sender_pb2_grpc
from telepathy.serving.lifecycle import BaseService

from .link import ReceiverPool
from .servicer import SenderServicer
from .settings import SenderSettings
from .work import SenderWork


class SenderService(BaseService):
    name = "sender"
    service_name = sender_pb2.DESCRIPTOR.services_by_name["Sender"].full_name

    def __init__(self, settings: SenderSettings, lm: LanguageModel | None = None):
        super().__init__(settings, lm)
        self.engine: SenderEngine | None = None
        self.work: SenderWork | None = None
        self.encoder = self.batcher("sender_encode", lambda key, items: self.work.encode(key, items))
        self.generator = self.batcher("sender_generate", lambda key, items: self.work.generate(key, items))
        self.link = self._make_link()
        self.servicer = SenderServicer(self)
        self.grpc.add_servicer(sender_pb2_grpc.add_SenderServicer_to_server, self.servicer)

    def _make_link(self):
        """The way to the receiver: a ReceiverPool of streams (pair_service: the receiver in this process)."""
        s = self.settings
        return ReceiverPool(s.receiver_addr, s.receiver_client(), self.metrics, streams=s.receiver_streams,
                            wait_s=s.receiver_wait_s)

    def fused_bridge(self, task: str) -> bool:
        """Whether a bridge-path Relay for `task` runs sender and receiver in one model call (pair_service)."""
        return False

    def attach(self, lm: LanguageModel, bridges: BridgeSet) -> None:
        self.engine = SenderEngine(lm, bridges)
        config = self.fast_path_config(lm)
        if config is not None:
            from telepathy.bridge.runtime.fastpath import SenderFastPath

            self.work = SenderWork(self.engine, SenderFastPath(self.engine, config))
        else:
            self.work = SenderWork(self.engine)

    def warmup(self) -> None:
        self.work.warmup(self.settings.max_batch_size, self.settings.wire_dtype)

    async def _after_load(self) -> None:
        await self.link.start()

    async def _after_grpc_stop(self) -> None:
        await self.link.close()


def build_sender(settings: SenderSettings, lm: LanguageModel | None = None) -> SenderService:
    """A sender for `settings`; `lm` skips loading settings.model (tests share one). Call inside the event loop."""
    return SenderService(settings, lm)
