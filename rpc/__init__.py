"""gRPC plumbing shared by the sender service, the receiver service and the gateway.

    settings.py  ServiceSettings (every service), env/CLI loading                       torch-free
    channels.py  ClientSettings, make_channel / make_sync_channel: dialing a service     torch-free
    auth.py      bearer-token interceptors (server and client), TLS/mTLS credentials     torch-free
    server.py    GrpcServer: options, auth, health, reflection, graceful stop
    service.py   BaseService: bind → load → warm up → SERVING → drain; model loading
    batcher.py   DynamicBatcher: bounded queue, max batch size, max queue delay, deadlines
    errors.py    ServiceError and the one exception → gRPC status map
    checks.py    edge checks on request fields (task, text)
    convert.py   protobuf ↔ WireTensor / ClassifyResult / Info messages
    metrics.py   Prometheus metrics, one CollectorRegistry per server
    serve.py     `telepathy serve sender|receiver`                                       torch-free
    client.py    SenderClient / ReceiverClient for agents
    harness.py   run a service in a background thread (tests, examples, benchmarks)

docs/SERVICES.md describes the services, their settings and the contract.
"""
