"""PairService: a SenderService that also runs the receiver — its model, bridges, batchers and Receiver servicer —
on the same port and model thread, with the bridge path fused into one model call.

    service = build_pair(PairSettings(model=..., receiver_model=..., device="cuda"))
    port = await service.start()     # bind (NOT_SERVING), load both models, warm up, SERVING for both services
    await service.stop()             # drain both
"""

from __future__ import annotations

from telepathy.bridge.runtime.engine import BridgeSet
from telepathy.bridge.lm import LanguageModel
from telepathy.receiver_service.app import ReceiverService
from telepathy.sender_service.app import SenderService

from .local import LocalReceiver
from .settings import PairSettings
from .work import PairWork


class PairService(SenderService):
    name = "pair"

    def __init__(self, settings: PairSettings, lm: LanguageModel | None = None, receiver_lm: LanguageModel | None = None):
        super().__init__(settings, lm)
        self.receiver = ReceiverService(settings.receiver_settings(), receiver_lm, host=self)
        self.link = LocalReceiver(self.receiver, self.metrics)
        self.fused = self.batcher("pair_relay", lambda key, items: self.pair_work.classify(key, items))
        self.pair_work: PairWork | None = None

    def service_names(self) -> list[str]:
        return [SenderService.service_name, ReceiverService.service_name]

    def _make_link(self):
        return None  # set in __init__, once the receiver part exists

    def fused_bridge(self, task: str) -> bool:
        return self.settings.fuse_bridge and self.pair_work is not None and task in self.pair_work.fused_tasks

    def _load(self) -> None:
        self.receiver._load()  # the receiver model and bridges, then the sender's; attach() joins them
        super()._load()

    def attach(self, lm: LanguageModel, bridges: BridgeSet) -> None:
        super().attach(lm, bridges)
        self.pair_work = PairWork(self.work, self.receiver.work)

    def warmup(self) -> None:
        super().warmup()
        self.receiver.warmup()
        if self.settings.fuse_bridge:
            self.pair_work.warmup(self.settings.max_batch_size, self.settings.wire_dtype)

    async def _begin_drain(self) -> None:
        await self.receiver._begin_drain()


def build_pair(settings: PairSettings, lm: LanguageModel | None = None, receiver_lm: LanguageModel | None = None) -> PairService:
    """A pair for `settings`; `lm` / `receiver_lm` skip loading the models (tests share them). Call inside the loop."""
    return PairService(settings, lm, receiver_lm)
