"""The services on the static-shape fast path (TELEPATHY_FAST_PATH=on; on the CPU it runs without graphs)
answer exactly what the eager engines answer."""

from __future__ import annotations

import pytest

from telepathy.config import SettingsError
from telepathy.sender_service.settings import SenderSettings
from tests.services_support import TIMEOUT, relay, sender_stub, start_receiver, start_sender
from tests.test_services_roundtrip import reference  # noqa: F401  (fixture: the in-process engines)


@pytest.fixture(scope="module")
def fast_pair(tiny_bridges_dir):
    receiver = start_receiver(tiny_bridges_dir, fast_path="on")
    sender = start_sender(tiny_bridges_dir, receiver.address, fast_path="on")
    yield sender, receiver
    sender.stop()
    receiver.stop()


@pytest.mark.parametrize("task", ["sst2", "ag_news", "trec"])
def test_fast_path_services_match_eager_engines(fast_pair, reference, task):
    sender, receiver = fast_pair
    assert type(sender.service.runtime.encoder).__name__ == "SenderFastPath"
    assert type(receiver.service.runtime.classifier).__name__ == "ReceiverFastPath"
    stub = sender_stub(sender.address)
    for text in ("a fine film", "the team won the final after a long season of many games"):
        got = stub.Relay(relay(task=task, text=text), timeout=TIMEOUT)
        assert [s.probability for s in got.result.scores] == pytest.approx(reference(text, task), abs=1e-5)


def test_fast_path_setting_is_validated():
    with pytest.raises(SettingsError, match="'fast' is not one of auto, on, off"):
        SenderSettings(model="random:tiny-llama", fast_path="fast")
