"""The model work of each side, batch by batch:

    engine.py    SenderEngine / ReceiverEngine: the eager reference, and the BridgeSet of loaded bridges
    factory.py   build_sender_runtime / build_receiver_runtime: the one place that picks eager or fast path
    fastpath     the static-shape fast path (CUDA graphs, fused layers): the same contracts as the engines
"""
