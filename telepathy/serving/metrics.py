"""Prometheus metrics of one service, in its own CollectorRegistry (several servers may share a process).

    telepathy_requests_total{method,code}         RPCs (and stream items, method "ClassifyStream.item") by status
    telepathy_request_seconds{method}             server-side RPC latency
    telepathy_stage_seconds{stage}                sender_queue, sender_model, wire, receiver_queue, receiver_model, total
    telepathy_batch_size{batcher}                 requests per model call
    telepathy_queue_depth{batcher}                requests waiting for a batch
    telepathy_skipped_total{batcher,reason}       requests dropped before the model: deadline, cancelled, queue_full
    telepathy_batches_stopped_total{batcher}      model calls ended early because every caller had gone (generation)
    telepathy_wire_bytes{path}                    payload bytes per request sent to the receiver (sender)
    telepathy_receiver_connected                  1 while the sender's stream to the receiver is up (sender)
    telepathy_receiver_reconnects_total           streams (re)opened to the receiver (sender)
    telepathy_service_info{service,version,model} constant 1, for joins
"""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

# 100 µs … 30 s: tiny CPU models answer in ~1 ms, real ones on a busy GPU in tens of ms, text relay in seconds.
LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BYTES_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)


class ServiceMetrics:
    def __init__(self, service: str, version: str = "", model: str = "", registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        self.service = service
        self.requests = Counter("telepathy_requests", "RPCs by method and status code", ["method", "code"], registry=r)
        self.request_seconds = Histogram("telepathy_request_seconds", "server-side RPC latency", ["method"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.stage_seconds = Histogram("telepathy_stage_seconds", "per-stage latency of a classification", ["stage"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("telepathy_batch_size", "requests per model call", ["batcher"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("telepathy_queue_depth", "requests waiting for a batch", ["batcher"], registry=r)
        self.skipped = Counter("telepathy_skipped", "requests dropped before the model call", ["batcher", "reason"], registry=r)
        self.batches_stopped = Counter("telepathy_batches_stopped", "model calls ended early: every caller had gone",
                                       ["batcher"], registry=r)
        self.wire_bytes = Histogram("telepathy_wire_bytes", "payload bytes per request sent to the receiver", ["path"],
                                    buckets=BYTES_BUCKETS, registry=r)
        self.receiver_connected = Gauge("telepathy_receiver_connected", "1 while the stream to the receiver is up", registry=r)
        self.reconnects = Counter("telepathy_receiver_reconnects", "streams (re)opened to the receiver", registry=r)
        self._info = Gauge("telepathy_service_info", "service identity", ["service", "version", "model"], registry=r)
        self.version = version
        self.set_model(model)
        self._http = None

    def set_model(self, model: str) -> None:
        self._info.clear()
        self._info.labels(self.service, self.version, model).set(1)

    def observe_request(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.requests.labels(method, code.name).inc()
        self.request_seconds.labels(method).observe(seconds)

    def observe_stages(self, timings_us: dict[str, int]) -> None:
        for stage, us in timings_us.items():
            self.stage_seconds.labels(stage).observe(us / 1e6)

    def render(self) -> bytes:
        """The text exposition format, as /metrics serves it."""
        return generate_latest(self.registry)

    def serve_http(self, host: str, port: int) -> None:
        """Expose /metrics on host:port (prometheus_client's own HTTP server, in a daemon thread)."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
