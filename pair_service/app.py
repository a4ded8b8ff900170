"""PairService: the sender and the receiver in one process — both models, both servicers, one port, one model
thread — with the bridge path fused into one model call.

    service = build_pair(PairSettings(model=..., receiver_model=..., device="cuda"))
    port = await service.start()     # bind (NOT_SERVING), load both models, warm up, SERVING for both services
    await service.stop()             # drain both

The wiring is the pair's own: it builds the Receiver servicer on its own batchers, hands the Sender servicer a
LocalReceiver as its link, and adds the fused batcher; the sender and receiver packages know nothing of it.
"""

from __future__ import annotations

from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.runtime.factory import build_receiver_runtime, build_sender_runtime
from telepathy.protos.v1 import receiver_pb2, receiver_pb2_grpc, sender_pb2, sender_pb2_grpc
from telepathy.receiver_service.app import check_message_size
from telepathy.receiver_service.servicer import ReceiverServicer
from telepathy.serving.lifecycle import BaseService, EngineSlot, load_side

from .local import LocalReceiver
from .servicer import PairSenderServicer
from .settings import PairSettings
from .work import PairWork


class PairService(BaseService):
    name = "pair"

    def __init__(self, settings: PairSettings, lm: LanguageModel | None = None, receiver_lm: LanguageModel | None = None,
                 tracer_provider=None):
        super().__init__(settings, tracer_provider)
        self._preloaded, self._preloaded_receiver = lm, receiver_lm
        self.receiver_settings = settings.receiver_settings()
        self.runtime = self.receiver_runtime = self.pair_work = None
        self.fused_tasks: set[str] = set()

        # The receiver half: its own batch sizes, on this process's model thread.
        self.receiver_slot = EngineSlot("receiver")
        self.soft_tokens = self.batcher("receiver_soft_tokens", self.receiver_settings)
        self.texts = self.batcher("receiver_text", self.receiver_settings)
        self.receiver_servicer = ReceiverServicer(self.receiver_settings, self.state, self.metrics, self.receiver_slot,
                                                  soft_tokens=self.soft_tokens, texts=self.texts,
                                                  tracing=self.tracing)
        # The sender half, whose link is the receiver half.
        self.engine_slot = EngineSlot(self.name)
        self.encoder = self.batcher("sender_encode")
        self.generator = self.batcher("sender_generate")
        self.fused = self.batcher("pair_relay")
        self.link = LocalReceiver(self.receiver_servicer, self.metrics)
        self.servicer = PairSenderServicer(settings, self.state, self.metrics, self.engine_slot, encoder=self.encoder,
                                           generator=self.generator, link=self.link, fused=self.fused,
                                           fused_tasks=self.fused_tasks, tracing=self.tracing)
        self.grpc.add_servicer(sender_pb2_grpc.add_SenderServicer_to_server, self.servicer)
        self.grpc.add_servicer(receiver_pb2_grpc.add_ReceiverServicer_to_server, self.receiver_servicer)

    def service_names(self) -> list[str]:
        return [sender_pb2.DESCRIPTOR.services_by_name["Sender"].full_name,
                receiver_pb2.DESCRIPTOR.services_by_name["Receiver"].full_name]

    def load(self) -> str:
        receiver_lm, receiver_bridges = load_side(self.receiver_settings, "receiver", self._preloaded_receiver, self.state)
        check_message_size(self.receiver_settings, receiver_bridges)
        self.receiver_runtime = build_receiver_runtime(receiver_lm, receiver_bridges, self.receiver_settings.fast_path)
        self.soft_tokens.bind(self.receiver_runtime.classify_latents)
        self.texts.bind(self.receiver_runtime.classify_text)
        self.receiver_slot.fill(self.receiver_runtime.engine)

        lm, bridges = load_side(self.settings, "sender", self._preloaded, self.state)
        self.runtime = build_sender_runtime(lm, bridges, self.settings.fast_path)
        self.encoder.bind(self.runtime.encode)
        self.generator.bind(self.runtime.generate, stoppable=True)
        self.engine_slot.fill(self.runtime.engine)

        self.pair_work = PairWork(self.runtime, self.receiver_runtime)
        self.fused.bind(self.pair_work.classify)
        if self.settings.fuse_bridge:
            self.fused_tasks.update(self.pair_work.fused_tasks)
        return lm.spec

    def warmup(self) -> None:
        self.runtime.warmup(self.settings.max_batch_size, self.settings.wire_dtype)
        self.receiver_runtime.warmup(self.receiver_settings.max_batch_size)
        if self.settings.fuse_bridge:
            self.pair_work.warmup(self.settings.max_batch_size, self.settings.wire_dtype)

    async def after_load(self) -> None:
        await self.link.start()

    async def begin_drain(self) -> None:
        self.receiver_servicer.drain()


def build_pair(settings: PairSettings, lm: LanguageModel | None = None, receiver_lm: LanguageModel | None = None,
               tracer_provider=None) -> PairService:
    """A pair for `settings`; `lm` / `receiver_lm` skip loading the models (tests share them); `tracer_provider`
    overrides the one settings.tracing builds. Call inside the loop."""
    return PairService(settings, lm, receiver_lm, tracer_provider)
