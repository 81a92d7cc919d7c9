"""shared/tracing.py on its own (docs/operations.md, "Traces"): which `OTEL_*` values turn
tracing on, what is added when it is off (nothing), the service name, database spans only
inside a span, and the consumer's span as a child of an event's trace parent."""

from __future__ import annotations

import subprocess
import sys

import pytest
from allot.quota.v1 import quota_pb2
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import create_engine, text

from shared import tracing
from shared.settings import REPO_ROOT, SettingsError

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    tracing.configure("quota", exporter, batch=False, environ={})
    try:
        yield exporter
    finally:
        tracing.shutdown()


@pytest.mark.parametrize(
    ("environ", "exporter"),
    [
        ({}, None),
        ({"OTEL_TRACES_EXPORTER": "none"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "Console"}, "console"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, None),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "otlp"),
    ],
)
def test_the_otel_variables_turn_tracing_on(environ, exporter):
    assert tracing.wanted_exporter(environ) == exporter


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            },
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ),
    ],
)
def test_a_value_we_cannot_honour_names_its_variable(environ, variable):
    with pytest.raises(SettingsError, match=variable):
        tracing.wanted_exporter(environ)


def test_off_adds_nothing():
    assert not tracing.configure_from_env("quota", {})
    assert not tracing.enabled()
    assert tracing.server_interceptors() == []
    assert tracing.client_interceptors() == []
    assert tracing.current_traceparent() == ""
    engine = create_engine("sqlite://")
    tracing.instrument_engine(engine)  # nothing registered: no listener to call
    with tracing.consuming("s", quota_pb2.QuotaEvent(trace_parent=PARENT)) as span:
        assert span is None


def test_on_from_the_environment_and_its_service_name():
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SERVICE_NAME": ""}
    try:
        assert tracing.configure_from_env("billing", environ)
        assert tracing.enabled()
        assert len(tracing.server_interceptors()) == 1
        assert len(tracing.client_interceptors()) == 4
        resource = tracing._provider.resource
        assert resource.attributes["service.name"] == "allot-billing"
        named = tracing.configure(
            "billing", InMemorySpanExporter(), environ={"OTEL_SERVICE_NAME": "billing-eu"}
        )
        assert named.resource.attributes["service.name"] == "billing-eu"
    finally:
        tracing.shutdown(within=1.0)
    assert not tracing.enabled()


def test_database_statements_are_spans_only_inside_a_span(spans):
    engine = create_engine("sqlite://")
    tracing.instrument_engine(engine)
    with engine.connect() as connection:
        connection.execute(text("select 1"))
        assert spans.get_finished_spans() == ()
        tracer = tracing._provider.get_tracer("test")
        with tracer.start_as_current_span("work") as work:
            connection.execute(text("select 2"))
    (statement, outer) = spans.get_finished_spans()
    assert outer.name == "work"
    assert statement.kind == SpanKind.CLIENT
    assert statement.parent.span_id == work.get_span_context().span_id
    assert "select 2" in statement.attributes["db.statement"]


def test_traceparent_of_the_current_span(spans):
    tracer = tracing._provider.get_tracer("test")
    assert tracing.current_traceparent() == ""  # outside any span
    with tracer.start_as_current_span("call") as call:
        context = call.get_span_context()
        assert tracing.current_traceparent() == (
            f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
        )


def test_a_consumer_span_is_a_child_of_the_event_trace_parent(spans):
    event = quota_pb2.QuotaEvent(event_id="evt-1", sequence=7, trace_parent=PARENT)
    event.pay_per_use_recorded.account_id = "acme"
    with tracing.consuming("quota@here", event):
        pass
    (span,) = spans.get_finished_spans()
    assert span.name == "consume pay_per_use_recorded"
    assert span.kind == SpanKind.CONSUMER
    assert span.context.trace_id == int(PARENT.split("-")[1], 16)
    assert span.parent.span_id == int(PARENT.split("-")[2], 16)
    assert span.attributes["messaging.destination.name"] == "quota@here"
    assert span.attributes["allot.event.sequence"] == 7


@pytest.mark.parametrize("parent", ["", "not a traceparent"])
def test_an_event_without_a_usable_parent_starts_a_trace(spans, parent):
    with tracing.consuming("s", quota_pb2.QuotaEvent(event_id="evt-2", trace_parent=parent)):
        pass
    (span,) = spans.get_finished_spans()
    assert span.parent is None
    assert span.name == "consume event"


def test_a_failing_effect_marks_the_span(spans):
    with pytest.raises(RuntimeError), tracing.consuming("s", quota_pb2.QuotaEvent()):
        raise RuntimeError("effect failed")
    (span,) = spans.get_finished_spans()
    assert not span.status.is_ok


def test_a_service_with_a_bad_otel_value_exits_at_start_naming_it(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "services.quota"],
        env={
            "PATH": "/usr/bin:/bin",
            "ALLOT_DATA_DIR": str(tmp_path),
            "OTEL_TRACES_EXPORTER": "zipkin",
        },
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert run.stderr == (
        "quota: OTEL_TRACES_EXPORTER: 'zipkin' is not one of otlp, console or none\n"
    )
