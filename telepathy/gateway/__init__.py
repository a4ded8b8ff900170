"""HTTP gateway: FastAPI app in front of the sender service, `telepathy up` (local launcher of all three
services), `telepathy bench` (latency benchmark client) and `telepathy healthcheck`.

    protocol.py  pydantic request/response models (the HTTP contract)
    serving.py   logic: checks, the sender client, gRPC → HTTP error map, concurrency limit, metrics
    app.py       build_app(settings): routes, error envelope, request-id middleware, lifespan-owned channels
    settings.py  GatewaySettings (CLI flags → TELEPATHY_* env → defaults)
    launcher.py  `telepathy up`
    bench.py     `telepathy bench`
    health.py    `telepathy healthcheck` probes
    cli.py       registers gateway / up / bench / healthcheck

torch-free: nothing here loads a model (the launcher starts the services as separate processes).
"""
