"""Traces (OpenTelemetry), opt-in with the standard `OTEL_*` variables (docs/operations.md,
"Traces").

Off by default: nothing is configured, `server_interceptors()` and `client_interceptors()` are
empty, engines are not instrumented and every other function returns at its first line, so a
service that does not trace pays one attribute look-up per call site and nothing else.

On (`configure_from_env` at start, or `configure` in a test with an exporter of its own):

- gRPC server and client spans (opentelemetry-instrumentation-grpc's `grpc.aio`
  interceptors); the client injects `traceparent` into the call's metadata and the server
  continues that trace, so billing's call to quota is one trace. `WatchEvents` streams,
  health and reflection make no spans: a stream lives for hours, and its events carry their
  own trace parents.
- database spans (opentelemetry-instrumentation-sqlalchemy's `EngineTracer`), one per
  statement, made only inside a span (a call, a consumed event): the background's statements
  (lease renewals, the outbox's polling, health pings) would otherwise each be a trace of one.
- events: the outbox stamps each event's envelope with the W3C `traceparent` of the span that
  wrote it (`current_traceparent`), and a consumer applies the event inside a CONSUMER span
  that is a *child* of it (`consuming`), so a call, the event it causes and what another
  service does with it read as one trace.

The provider is this module's own (not OpenTelemetry's global one, which can be set only once
per process), so a test can configure tracing with an in-memory exporter and `shutdown()` it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from shared.settings import SettingsError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

# Calls that make no span: long-lived streams (their events carry their own trace parents)
# and the probes' and tools' calls.
UNTRACED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
UNTRACED_METHODS = ("/WatchEvents", "/WatchNotifications")
# How long a stopping service waits for its last spans to reach the collector.
SHUTDOWN_SECONDS = 3.0
EXPORTERS = ("otlp", "console")

# Set by `configure` (the OpenTelemetry SDK is imported only then: a service that does not
# trace does not load it).
_provider: TracerProvider | None = None
_tracer: Tracer | None = None


def enabled() -> bool:
    return _provider is not None


def wanted_exporter(environ: Mapping[str, str] | None = None) -> str | None:
    """The exporter the `OTEL_*` variables ask for, or None when tracing stays off.

    Tracing is on with `OTEL_TRACES_EXPORTER=otlp|console`, or with an OTLP endpoint
    (`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) and no exporter
    named; `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` keeps it off. A value we
    cannot honour stops the service naming the variable, like a bad `ALLOT_*` setting.
    """
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not named:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        named = "otlp" if endpoint else "none"
    if named == "none":
        return None
    if named not in EXPORTERS:
        raise SettingsError(
            f"OTEL_TRACES_EXPORTER: {named!r} is not one of {', '.join(EXPORTERS)} or none"
        )
    if named == "otlp":
        for variable in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = env.get(variable, "").strip().lower()
            if protocol and protocol != "grpc":
                raise SettingsError(f"{variable}: only grpc is supported, not {protocol!r}")
            if protocol:
                break
    return named


def configure_from_env(service_name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on when the `OTEL_*` variables ask for it (once, at a service's start);
    True when it is on. The OTLP exporter reads its endpoint, headers, certificate and timeout
    from the standard variables itself; the sampler follows `OTEL_TRACES_SAMPLER`."""
    named = wanted_exporter(environ)
    if named is None:
        return False
    if named == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter: SpanExporter = OTLPSpanExporter()
    else:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        exporter = ConsoleSpanExporter()
    configure(service_name, exporter, environ=environ)
    return True


def configure(
    service_name: str,
    exporter: SpanExporter,
    *,
    batch: bool = True,
    environ: Mapping[str, str] | None = None,
) -> TracerProvider:
    """Trace into `exporter` from now on (servers, channels and engines made after this).
    `service.name` is `OTEL_SERVICE_NAME` when set, else `allot-<service>`; `batch=False`
    exports each span as it ends (tests)."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    global _provider, _tracer
    env = os.environ if environ is None else environ
    attributes: dict[str, Any] = {
        SERVICE_NAME: env.get("OTEL_SERVICE_NAME") or f"allot-{service_name}"
    }
    provider = TracerProvider(resource=Resource.create(attributes))
    processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    if _provider is not None:
        shutdown()
    _provider = provider
    _tracer = provider.get_tracer("allot")
    return provider


def shutdown(within: float = SHUTDOWN_SECONDS) -> None:
    """Export what is buffered and stop tracing, for at most `within` seconds (an unreachable
    collector must not hold the process: spans still queued then are lost)."""
    global _provider, _tracer
    provider, _provider, _tracer = _provider, None, None
    if provider is None:
        return
    worker = threading.Thread(target=provider.shutdown, name="tracing-shutdown", daemon=True)
    worker.start()
    worker.join(within)


def _traced(details) -> bool:
    method = details.method
    if isinstance(method, bytes):
        method = method.decode()
    return not method.startswith(UNTRACED_PREFIXES) and not method.endswith(UNTRACED_METHODS)


def server_interceptors() -> list:
    """The server's tracing interceptor (outermost, so refused calls have spans too), or none."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=_provider, filter_=_traced)]


def client_interceptors() -> list:
    """Interceptors for an outbound channel: a client span per call and `traceparent` in its
    metadata; none when off."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return aio_client_interceptors(tracer_provider=_provider, filter_=_traced)


def instrument_engine(engine) -> None:
    """Database spans for a SQLAlchemy engine (async or not), when tracing is on."""
    if _provider is None:
        return
    from opentelemetry import metrics, trace
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer

    class ChildSpansOnly(trace.Tracer):
        """Starts spans only under a current span: the statements of the background (lease
        renewals, the outbox's polling, health pings) make no traces of their own."""

        def __init__(self, tracer: trace.Tracer) -> None:
            self._tracer = tracer

        def start_span(self, name, context=None, *args, **kwargs):
            if not trace.get_current_span(context).get_span_context().is_valid:
                return trace.INVALID_SPAN
            return self._tracer.start_span(name, context, *args, **kwargs)

        def start_as_current_span(self, name, context=None, *args, **kwargs):
            if not trace.get_current_span(context).get_span_context().is_valid:
                return trace.use_span(trace.INVALID_SPAN)
            return self._tracer.start_as_current_span(name, context, *args, **kwargs)

    tracer = _provider.get_tracer("opentelemetry.instrumentation.sqlalchemy")
    # EngineTracer also counts pooled connections: into a no-op meter (metrics are not ours).
    usage = metrics.NoOpMeter("allot").create_up_down_counter("db.client.connections.usage")
    EngineTracer(ChildSpansOnly(tracer), getattr(engine, "sync_engine", engine), usage)


def current_traceparent() -> str:
    """The W3C `traceparent` of the current span ('' when off or outside a span), for an
    event's envelope."""
    if _provider is None:
        return ""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent", "")


_NO_SPAN = contextlib.nullcontext()


def consuming(stream: str, event: Any):
    """The span (a context manager) in which a consumer applies `event` of `stream`: a child
    of the span that wrote the event when its envelope has a `trace_parent`, a new trace
    otherwise. A no-op when off."""
    if _tracer is None:
        return _NO_SPAN
    return _consuming(_tracer, stream, event)


@contextlib.contextmanager
def _consuming(tracer: Tracer, stream: str, event: Any) -> Iterator[Span]:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = getattr(event, "trace_parent", "")
    context = (
        TraceContextTextMapPropagator().extract({"traceparent": parent})
        if parent
        else otel_context.Context()
    )
    which = getattr(event, "WhichOneof", None)
    event_type = (which("payload") if which else None) or "event"
    attributes = {
        "messaging.system": "allot",
        "messaging.operation.type": "process",
        "messaging.destination.name": stream,
        "messaging.message.id": getattr(event, "event_id", ""),
        "allot.event.sequence": int(getattr(event, "sequence", 0)),
        "allot.event.type": event_type,
    }
    with tracer.start_as_current_span(
        f"consume {event_type}",
        context=context,
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
    ) as span:
        yield span
