"""OpenTelemetry tracing: off by default, on through the settings (`tracing`: off, console, otlp).

No global provider: `tracer_provider(settings, service)` builds one TracerProvider from the settings (None when
tracing is off), and the factories take it (`build_sender(..., tracer_provider=)`, `build_app(...)`); tests hand
one provider with an in-memory exporter to all of them. `Tracing(provider)` is what the plumbing holds: with no
provider every method is a no-op and nothing of OpenTelemetry is imported, so the packages (the `[tracing]` extra)
are only needed when tracing is on.

Spans (docs/SERVICES.md, "Tracing and logs"): the gRPC server span of each RPC (the OTel gRPC interceptor; W3C
trace context in the call's metadata), `gateway <path>` in the gateway, `<batcher> queue` / `<batcher> model` per
model stage, `receiver.stream send` around one item on the sender → receiver stream (whose context travels in
the item's `trace_context` field, as the stream itself outlives any one request) and `receiver.item` on the
receiver. Attributes: telepathy.task, telepathy.path, telepathy.request_id, telepathy.wire_bytes,
telepathy.batch_size.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

from telepathy.config import SettingsError

_SKIP_METHODS = ("ClassifyStream",)  # the long-lived stream: each item gets its own span instead
_SKIP_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")


def tracer_provider(mode: str, endpoint: str, service: str):
    """A TracerProvider exporting to the console or to an OTLP/HTTP collector at `endpoint`; None for "off"."""
    if mode == "off":
        return None
    try:
        from opentelemetry.instrumentation import grpc as _grpc  # noqa: F401 - the interceptors need it
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ModuleNotFoundError as exc:
        raise SettingsError(f"tracing={mode} needs the OpenTelemetry packages ({exc.name} is not installed): "
                            "pip install 'telepathy-llm[tracing]'") from None

    provider = TracerProvider(resource=Resource.create({"service.name": f"telepathy-{service}"}))
    if mode == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def shutdown(provider) -> None:
    """Flush and stop a provider this component built (its batch of spans not yet exported goes out now)."""
    if provider is not None:
        provider.shutdown()


def _filter():
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(filters.any_of(*(filters.method_name(m) for m in _SKIP_METHODS),
                                         *(filters.service_name(s) for s in _SKIP_SERVICES)))


class Tracing:
    """One component's tracer; `Tracing(None)` (tracing off) does nothing and costs a None check."""

    def __init__(self, provider=None, name: str = "telepathy"):
        self.provider = provider
        self.tracer = provider.get_tracer(name) if provider is not None else None

    @property
    def on(self) -> bool:
        return self.tracer is not None

    def server_interceptors(self) -> list:
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        return [aio_server_interceptor(tracer_provider=self.provider, filter_=_filter())]

    def client_interceptors(self) -> list:
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        return list(aio_client_interceptors(tracer_provider=self.provider, filter_=_filter()))

    @contextlib.contextmanager
    def span(self, name: str, kind: str = "INTERNAL", carrier: MutableMapping[str, str] | None = None,
             parent: MutableMapping[str, str] | None = None, **attributes: Any) -> Iterator[Any]:
        """A span around the block (None when off). `carrier`: inject its context there (W3C traceparent);
        `parent`: a carrier to continue from instead of the current context."""
        if self.tracer is None:
            yield None
            return
        from opentelemetry import propagate, trace

        context = propagate.extract(parent) if parent else None
        with self.tracer.start_as_current_span(name, context=context, kind=getattr(trace.SpanKind, kind),
                                               attributes=_attrs(attributes)) as span:
            if carrier is not None:
                propagate.inject(carrier)
            yield span

    def stage(self, batcher: str, submitted: float, timing, **attributes: Any) -> None:
        """A model stage after the fact: `<batcher> queue` (submit → batch start) and `<batcher> model` (the
        batch's model call), from a serving.batcher BatchTiming; `submitted` is its time.monotonic() value."""
        if self.tracer is None or timing is None:
            return
        offset = time.time_ns() - time.monotonic_ns()
        start = int(submitted * 1e9) + offset
        queued = start + int(timing.queue_s * 1e9)
        attrs = _attrs({**attributes, "batch_size": timing.batch_size})
        self.tracer.start_span(f"{batcher} queue", start_time=start, attributes=attrs).end(end_time=queued)
        self.tracer.start_span(f"{batcher} model", start_time=queued, attributes=attrs).end(
            end_time=queued + int(timing.model_s * 1e9))


def current_span():
    from opentelemetry import trace

    return trace.get_current_span()


def set_attributes(span, **attributes: Any) -> None:
    if span is not None:
        span.set_attributes(_attrs(attributes))


def _attrs(attributes: dict[str, Any]) -> dict[str, Any]:
    return {f"telepathy.{k}": v for k, v in attributes.items() if v is not None}
