"""The pair service: sender and receiver in one process, for one GPU (or two GPUs of one host).

It answers the Sender and the Receiver gRPC services on one port. A bridge-path Relay runs as one model call —
sender layers, bridge, wire quantisation, adapter, receiver layers — with the soft tokens handed over on the
device: no stream hop, no second queue, no second host sync. Everything else (the text path, Encode, the
receiver's ClassifyStream for other senders) works as in the two services.

    settings.py  PairSettings
    work.py      the fused bridge path: one model call from text to label probabilities
    local.py     the receiver inside this process (the sender's link)
    app.py       PairService / build_pair()

Run it with `telepathy serve pair` (see docs/SERVICES.md).
"""
