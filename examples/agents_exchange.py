"""Two agents exchange soft tokens through the receiver service; a third brings its own bridge encoder.

    alice  has no model: asks the sender service to encode her message (Sender.Encode) and hands the soft
           tokens to bob as bytes (any transport works: a queue, a file, another RPC).
    bob    parses them and asks the receiver what they say (Receiver.Classify). He never sees alice's text.
    carol  runs the sender LLM and a bridge encoder herself and sends her own soft tokens (Receiver.Classify),
           after reading the fingerprint they must carry from Receiver.ListBridges.

    python examples/agents_exchange.py                       # starts both services in-process (tiny pair)
    python examples/agents_exchange.py --sender 127.0.0.1:50051 --receiver 127.0.0.1:50052 \
        --sender-model smollm2-135m-instruct --bridges bridge/bridges   # against running services

With the tiny random pair and untrained bridges the labels are arbitrary; the plumbing is the real thing.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile

from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.models import TINY_RECEIVER, TINY_SENDER
from telepathy.bridge.runtime.engine import SenderEngine, load_bridge_set
from telepathy.bridge.tasks import BUILTIN_TASKS
from telepathy.client import ReceiverClient, SenderClient, SoftTokens
from telepathy.protos.v1 import common_pb2
from telepathy.receiver_service.app import build_receiver
from telepathy.receiver_service.settings import ReceiverSettings
from telepathy.sender_service.app import build_sender
from telepathy.sender_service.settings import SenderSettings
from telepathy.testing import ServiceThread, make_untrained_bridges

TASK = next(iter(BUILTIN_TASKS))  # the first built-in task: news topics
MESSAGE = "the striker scored twice in the second half and the home team won the cup"


@contextlib.contextmanager
def local_services(workdir: str):
    """Receiver + sender on loopback ephemeral ports, tiny random pair, untrained bridges."""
    sender_lm, receiver_lm = LanguageModel.load(TINY_SENDER), LanguageModel.load(TINY_RECEIVER)
    bridges = str(make_untrained_bridges(workdir, sender_lm, receiver_lm))
    rs = ReceiverSettings(port=0, model=TINY_RECEIVER, bridges=bridges)
    with ServiceThread(lambda: build_receiver(rs, receiver_lm), "receiver") as receiver:
        ss = SenderSettings(port=0, model=TINY_SENDER, bridges=bridges, receiver_addr=receiver.address)
        with ServiceThread(lambda: build_sender(ss, sender_lm), "sender") as sender:
            yield sender.address, receiver.address, TINY_SENDER, bridges


def alice(sender: SenderClient) -> bytes:
    soft = sender.encode(MESSAGE, task=TASK, wire_dtype="int8")
    print(f"alice: encoded {len(MESSAGE)} chars into {soft.shape[0]} soft tokens × {soft.shape[1]} "
          f"({soft.nbytes} bytes, bridge {soft.bridge_id})")
    return soft.to_pb().SerializeToString()


def bob(receiver: ReceiverClient, payload: bytes) -> str:
    msg = common_pb2.SoftTokens()
    msg.ParseFromString(payload)
    result = receiver.classify(SoftTokens.from_pb(msg))
    print(f"bob:   the receiver reads alice's soft tokens as {result.label!r} "
          f"({', '.join(f'{k} {v:.2f}' for k, v in result.scores.items())})")
    return result.label


def carol(receiver: ReceiverClient, sender_model: str, bridges: str) -> str:
    lm = LanguageModel.load(sender_model)
    engine = SenderEngine(lm, load_bridge_set(bridges, lm, "sender", lm.device))
    latents, meta = engine.encode([MESSAGE], TASK)  # [1, K, d_wire]
    fingerprint = receiver.fingerprint(TASK)
    if fingerprint != meta.fingerprint:
        raise SystemExit(f"carol's bridge {meta.fingerprint} is not the receiver's {fingerprint}: they cannot talk")
    result = receiver.classify_latents(latents[0], task=TASK, fingerprint=fingerprint, wire_dtype="int8")
    print(f"carol: her own encoder's soft tokens read as {result.label!r} "
          f"(receiver model {result.timings_us.get('receiver_model', 0)} µs)")
    return result.label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sender", help="sender HOST:PORT (default: start both services in-process)")
    parser.add_argument("--receiver", help="receiver HOST:PORT")
    parser.add_argument("--sender-model", default=TINY_SENDER, help="carol's local sender model")
    parser.add_argument("--bridges", help="carol's bridge folder (carol is skipped without it when remote)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        if args.sender and args.receiver:
            sender_addr, receiver_addr, sender_model, bridges = args.sender, args.receiver, args.sender_model, args.bridges
        else:
            sender_addr, receiver_addr, sender_model, bridges = stack.enter_context(local_services(tmp))
        sender = stack.enter_context(SenderClient(sender_addr))
        receiver = stack.enter_context(ReceiverClient(receiver_addr))
        label_bob = bob(receiver, alice(sender))
        if bridges:
            label_carol = carol(receiver, sender_model, bridges)
            print(f"same message, same bridge → same reading: {label_bob == label_carol}")
        relayed = sender.relay(MESSAGE, task=TASK)
        print(f"(for comparison, Sender.Relay: {relayed.label!r}, {relayed.wire_bytes} wire bytes, "
              f"timings µs {relayed.timings_us})")


if __name__ == "__main__":
    main()
