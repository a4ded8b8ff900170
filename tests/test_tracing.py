"""OpenTelemetry tracing end to end: real gateway, sender and receiver on loopback (tiny models), each with its own
tracer provider and in-memory exporter; one /v1/classify request is one trace across the three, with the span
names, parent links and attributes of docs/SERVICES.md ("Tracing and logs"). Tracing off: no OTel anywhere."""

from __future__ import annotations

import asyncio

import httpx
import pytest

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("opentelemetry.instrumentation.fastapi")

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from services_support import wait_for  # noqa: E402

from telepathy.bridge.models import TINY_RECEIVER, TINY_SENDER  # noqa: E402
from telepathy.gateway.app import build_app  # noqa: E402
from telepathy.gateway.settings import GatewaySettings  # noqa: E402
from telepathy.receiver_service.app import build_receiver  # noqa: E402
from telepathy.receiver_service.settings import ReceiverSettings  # noqa: E402
from telepathy.sender_service.app import build_sender  # noqa: E402
from telepathy.sender_service.settings import SenderSettings  # noqa: E402
from telepathy.testing import GatewayThread, ServiceThread  # noqa: E402

RELAY = "/telepathy.v1.Sender/Relay"


def _provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture(scope="module")
def traced(tiny_bridges_dir, tiny_sender, tiny_receiver):
    (rp, rx), (sp, sx), (gp, gx) = _provider(), _provider(), _provider()
    common = dict(bridges=str(tiny_bridges_dir), port=0, max_batch_size=4, grace_s=1.0)
    receiver = ServiceThread(lambda: build_receiver(ReceiverSettings(model=TINY_RECEIVER, **common), tiny_receiver, rp),
                             "receiver").start()
    sender = ServiceThread(lambda: build_sender(SenderSettings(model=TINY_SENDER, receiver_addr=receiver.address,
                                                               max_relay_tokens=4, **common), tiny_sender, sp),
                           "sender").start()
    gateway = GatewayThread(GatewaySettings(port=0, sender_addr=sender.address), tracer_provider=gp).start()
    yield gateway, {"gateway": gx, "sender": sx, "receiver": rx}
    gateway.stop()
    sender.stop()
    receiver.stop()


def _classify(gateway, exporters, path: str, names: dict[str, set[str]]):
    for exporter in exporters.values():
        exporter.clear()
    r = httpx.post(f"{gateway.url}/v1/classify", json={"task": "sst2", "text": "a fine film", "path": path},
                   headers={"x-request-id": f"trace-{path}"}, timeout=60)
    assert r.status_code == 200, r.text

    def spans(who):
        return {s.name: s for s in exporters[who].get_finished_spans()}

    wait_for(lambda: all(names[who] <= set(spans(who)) for who in names), what="all spans exported")
    return r.json(), {who: spans(who) for who in names}


@pytest.mark.parametrize("path, sender_stage, receiver_stage", [
    ("bridge", "sender_encode", "receiver_soft_tokens"), ("text", "sender_generate", "receiver_text")])
def test_one_classify_is_one_trace_across_gateway_sender_receiver(traced, path, sender_stage, receiver_stage):
    gateway, exporters = traced
    names = {"gateway": {"POST /v1/classify", f"gateway {path}", RELAY},
             "sender": {RELAY, f"{sender_stage} queue", f"{sender_stage} model", "receiver.stream send"},
             "receiver": {"receiver.item", f"{receiver_stage} queue", f"{receiver_stage} model"}}
    body, spans = _classify(gateway, exporters, path, names)
    every = [s for by_name in spans.values() for s in by_name.values()]
    assert len({s.context.trace_id for s in every}) == 1, "one trace id across gateway, sender and receiver"
    # Nothing else was traced for this request (health checks, the long-lived stream itself are filtered out).
    assert set(spans["gateway"]) == names["gateway"] and set(spans["sender"]) == names["sender"]
    assert set(spans["receiver"]) == names["receiver"]

    g, s, r = spans["gateway"], spans["sender"], spans["receiver"]

    def parent(child, of):
        assert child.parent is not None and child.parent.span_id == of.context.span_id, (child.name, of.name)

    assert g["POST /v1/classify"].parent is None  # the root: the caller sent no traceparent
    parent(g[f"gateway {path}"], g["POST /v1/classify"])
    parent(g[RELAY], g[f"gateway {path}"])
    parent(s[RELAY], g[RELAY])  # across the gRPC hop: W3C trace context in the call's metadata
    for name in (f"{sender_stage} queue", f"{sender_stage} model", "receiver.stream send"):
        parent(s[name], s[RELAY])
    parent(r["receiver.item"], s["receiver.stream send"])  # across the stream: the item's trace_context field
    parent(r[f"{receiver_stage} queue"], r["receiver.item"])
    parent(r[f"{receiver_stage} model"], r["receiver.item"])

    wire = body["wire_bytes"]
    assert wire > 0
    assert dict(g[f"gateway {path}"].attributes) == {
        "telepathy.task": "sst2", "telepathy.path": path, "telepathy.request_id": f"trace-{path}",
        "telepathy.wire_bytes": wire, "telepathy.label": body["label"]}
    relay = s[RELAY].attributes
    assert (relay["telepathy.task"], relay["telepathy.path"], relay["telepathy.request_id"],
            relay["telepathy.wire_bytes"]) == ("sst2", path, f"trace-{path}", wire)
    send = s["receiver.stream send"].attributes
    assert (send["telepathy.task"], send["telepathy.path"], send["telepathy.wire_bytes"]) == ("sst2", path, wire)
    for stage in (s[f"{sender_stage} model"], s[f"{sender_stage} queue"], r[f"{receiver_stage} model"]):
        assert stage.attributes["telepathy.batch_size"] == 1 and stage.attributes["telepathy.batch_key"]
        assert stage.start_time <= stage.end_time
    assert s[f"{sender_stage} queue"].end_time == s[f"{sender_stage} model"].start_time
    item = r["receiver.item"].attributes
    assert (item["telepathy.task"], item["telepathy.path"], item["telepathy.status"]) == ("sst2", path, "OK")
    assert item["telepathy.wire_bytes"] > 0


def test_tracing_off_by_default_takes_no_otel_path(tiny_bridges_dir):
    async def build():
        sender = build_sender(SenderSettings(model=TINY_SENDER, bridges=str(tiny_bridges_dir), port=0))
        receiver = build_receiver(ReceiverSettings(model=TINY_RECEIVER, bridges=str(tiny_bridges_dir), port=0))
        return sender, receiver

    sender, receiver = asyncio.run(build())
    for service in (sender, receiver):
        assert service.settings.tracing == "off" and not service.tracing.on and service.tracing.provider is None
        assert service.tracing.server_interceptors() == []
        assert all(b._tracing is None for b in service.batchers)
        assert service.servicer.tracing.on is False
    app = build_app(GatewaySettings(port=0))
    assert not app.state.clients.tracing.on and app.state.clients.tracing.client_interceptors() == []
    assert "OpenTelemetryMiddleware" not in repr(app.user_middleware)


def test_tracing_settings_build_a_provider_and_refuse_unknown_modes():
    from telepathy.config import SettingsError
    from telepathy.serving.tracing import tracer_provider

    assert tracer_provider("off", "", "sender") is None
    provider = tracer_provider("otlp", "http://127.0.0.1:4318/v1/traces", "sender")
    assert provider.resource.attributes["service.name"] == "telepathy-sender"
    provider.shutdown()
    with pytest.raises(SettingsError, match="tracing"):
        SenderSettings(tracing="jaeger")
    with pytest.raises(SettingsError, match="tracing"):
        GatewaySettings(tracing="jaeger")


# -- JSON log lines -------------------------------------------------------------------------------------------------

def test_json_log_line_carries_the_request_id_and_trace_id(traced):
    import json
    import logging

    from telepathy.serving.logs import JsonFormatter

    gateway, exporters = traced
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler = Capture()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("telepathy.gateway.serving")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        body, spans = _classify(gateway, exporters, "bridge", {"gateway": {"POST /v1/classify"}})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    records = [json.loads(line) for line in lines]
    line = next(r for r in records if r["message"].startswith("classified task=sst2 path=bridge"))
    assert {"time", "level", "logger", "message", "request_id", "trace_id"} <= set(line)
    assert (line["level"], line["logger"], line["request_id"]) == ("DEBUG", "telepathy.gateway.serving", "trace-bridge")
    assert line["trace_id"] == f"{spans['gateway']['POST /v1/classify'].context.trace_id:032x}"
    assert line["time"].endswith("Z")


def test_services_write_json_log_lines(tmp_path, tiny_bridges_dir):
    import json
    import re

    from services_support import ServiceProcess

    from telepathy.testing import free_port

    proc = ServiceProcess("receiver", free_port(), tiny_bridges_dir, tmp_path, env={"TELEPATHY_LOG_FORMAT": "json"})
    try:
        proc.wait_serving()
    finally:
        proc.kill()
    text = proc.log()
    assert not re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ", text, re.M), text  # no text-format line
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    ours = [r for r in records if r["logger"].startswith("telepathy.")]
    assert ours, text
    for r in ours:
        assert {"time", "level", "logger", "message"} <= set(r)
    assert any(r["logger"] == "telepathy.serving.lifecycle" and "bridges from" in r["message"] for r in ours), text


def test_tracing_on_without_the_packages_is_a_settings_error(monkeypatch):
    import sys

    from telepathy.config import SettingsError
    from telepathy.serving.tracing import tracer_provider

    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if opentelemetry-sdk were not installed
    with pytest.raises(SettingsError, match=r"tracing=otlp needs the OpenTelemetry packages .*telepathy-llm\[tracing\]"):
        tracer_provider("otlp", "http://127.0.0.1:4318/v1/traces", "sender")


def test_errors_keep_their_status_with_tracing_on(traced):
    gateway, exporters = traced
    for exporter in exporters.values():
        exporter.clear()
    r = httpx.post(f"{gateway.url}/v1/classify", json={"task": "no_such_task", "text": "a fine film"}, timeout=60)
    assert r.status_code == 404, r.text  # the sender's NOT_FOUND through the traced hops, as without tracing
    wait_for(lambda: RELAY in {s.name for s in exporters["sender"].get_finished_spans()}, what="the Relay span")
    relay = next(s for s in exporters["sender"].get_finished_spans() if s.name == RELAY)
    assert relay.attributes["rpc.grpc.status_code"] == 5  # NOT_FOUND (a server span's status stays UNSET for it: OTel's rule)
    wait_for(lambda: len(exporters["gateway"].get_finished_spans()) == 3, what="the gateway's spans")
    g = {s.name: s for s in exporters["gateway"].get_finished_spans()}
    assert g[RELAY].status.status_code.name == "ERROR" and g[RELAY].attributes["rpc.grpc.status_code"] == 5
    assert g["gateway bridge"].status.status_code.name == "ERROR"
    assert g["POST /v1/classify"].attributes["http.status_code"] == 404
    assert r.json()["error"]["type"] == "not_found_error"


def test_pair_service_traces_its_relay_and_stages(tiny_bridges_dir, tiny_sender, tiny_receiver):
    from telepathy.pair_service.app import build_pair
    from telepathy.pair_service.settings import PairSettings

    (pp, px), (gp, gx) = _provider(), _provider()
    pair = ServiceThread(lambda: build_pair(PairSettings(
        model=TINY_SENDER, receiver_model=TINY_RECEIVER, bridges=str(tiny_bridges_dir), port=0, device="cpu",
        max_batch_size=4, grace_s=1.0), tiny_sender, tiny_receiver, pp), "pair").start()
    try:
        with GatewayThread(GatewaySettings(port=0, sender_addr=pair.address), tracer_provider=gp) as gateway:
            names = {"gateway": {"POST /v1/classify", "gateway bridge", RELAY}, "pair": {RELAY}}
            _, spans = _classify(gateway, {"gateway": gx, "pair": px}, "bridge", names)
    finally:
        pair.stop()
    every = [s for by_name in spans.values() for s in by_name.values()]
    assert len({s.context.trace_id for s in every}) == 1
    stages = [s for s in px.get_finished_spans() if s.name.endswith((" queue", " model"))]
    assert stages and all(s.parent.span_id == spans["pair"][RELAY].context.span_id for s in stages)
    assert all(s.attributes["telepathy.batch_size"] == 1 for s in stages)
