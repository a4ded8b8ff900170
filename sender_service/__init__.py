"""Sender service: text in; soft tokens, relay text or the receiver's answer out, over gRPC.

    settings.py  SenderSettings
    link.py      ReceiverLink: one channel + one bidi stream to the receiver, reconnect with backoff
    work.py      batch functions and warm-up, on bridge.runtime.engine.SenderEngine
    servicer.py  SenderServicer: protobuf ↔ batches (Relay, Encode, Generate, Info)
    app.py       SenderService / build_sender(): the servicer on an telepathy.serving.server.GrpcServer

Run it with `telepathy serve sender` (see docs/SERVICES.md).
"""
