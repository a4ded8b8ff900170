"""The pair service: sender and receiver in one process, for one GPU (or two GPUs of one host).

It answers the Sender and the Receiver gRPC services on one port. A bridge-path Relay runs as one model call —
sender layers, bridge, wire quantisation, adapter, receiver layers — with the soft tokens handed over on the
device: no stream hop, no second queue, no second host sync. Everything else (the text path, Encode, the
receiver's ClassifyStream for other senders) works as in the two services.
"""

from .app import PairService, build_pair
from .settings import PairSettings

__all__ = ["PairService", "PairSettings", "build_pair"]
