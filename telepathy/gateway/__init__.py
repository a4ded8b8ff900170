"""HTTP gateway: the FastAPI app in front of the sender service.

    protocol.py  pydantic request/response models (the HTTP contract)
    serving.py   logic: checks, the sender client, concurrency limit, request budget, metrics
    errors.py    the one error envelope: GatewayError, the gRPC → HTTP status map, the exception handlers
    routes/      one router per feature (classify, catalog, ops), attached by app.py
    app.py       build_app(settings): routes, error envelope, request-id middleware, lifespan-owned channels
    settings.py  GatewaySettings
    cli.py       registers `telepathy gateway` (and the ops commands `up`, `bench`, `healthcheck`, in telepathy/ops/)

torch-free: nothing here loads a model.
"""
