"""Receiver service: soft tokens (or relay text) in, label probabilities out, over gRPC.

    settings.py  ReceiverSettings
    validate.py  request checks: task, bridge, fingerprint, tensor (dtype/shape/bytes/NaN), text
    work.py      batch functions and warm-up, on bridge.runtime.engine.ReceiverEngine
    servicer.py  ReceiverServicer: protobuf ↔ batches (Classify, ClassifyStream, ClassifyText, ListBridges, Info)
    app.py       ReceiverService / build_receiver(): the servicer on an telepathy.serving.server.GrpcServer

Run it with `telepathy serve receiver` (see docs/SERVICES.md).
"""
