"""Traces across the services (docs/operations.md, "Traces"), with OpenTelemetry's in-memory
exporter configured through `shared.tracing.configure` and real in-process billing and quota
servers.

- One purchase (billing's PurchasePackage, which calls quota's GrantPackage) is ONE trace: the
  billing server span is its only root, billing's client span for GrantPackage is a child of
  it, quota's server span a child of that (the `traceparent` metadata), and both services'
  database statements are spans under their own server spans. The events the purchase writes
  (billing's order_updated) carry that trace's parent.
- A service process traces when `OTEL_*` says so (`run_service` configures it; the console
  exporter prints its spans, flushed at SIGTERM).
- A consumed event continues its trace: a ReportUsage call paid by pay-per-use writes
  pay_per_use_recorded; billing's stream consumer applies it in a CONSUMER span that is a
  child of quota's ReportUsage span, and billing's database statements of that effect are
  under it. A refused call has a server span with its status code.

Both on SQLite and PostgreSQL; every wait is bounded (`until`).
"""

from __future__ import annotations

import grpc
import pytest
from allot.billing.v1 import billing_pb2, billing_service_pb2
from allot.quota.v1 import quota_service_pb2
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from shared import tracing
from tests.support.billing import billing_settings, running_billing
from tests.support.events import PAY_PER_USE_RECORDED
from tests.support.events import events as read_events
from tests.support.notification import until
from tests.support.quota import (
    QuotaCalls,
    quota_calls,
    quota_env,
    quota_process,
    quota_settings,
    running_quota,
)

START = "2024-05-01T02:00:00Z"
ACCOUNT = "acme"
REGION = "ap-southeast-1"
PURCHASE = "/allot.billing.v1.BillingService/PurchasePackage"
GRANT = "/allot.quota.v1.QuotaService/GrantPackage"
REPORT = "/allot.quota.v1.QuotaService/ReportUsage"
LIST = "/allot.quota.v1.QuotaService/ListPackages"
WITHIN = 30.0


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    # Each span exported as it ends; OTEL_* of the developer's shell ignored.
    tracing.configure("test", exporter, batch=False, environ={})
    try:
        yield exporter
    finally:
        tracing.shutdown()


def trace_id_of(traceparent: str) -> int:
    version, trace_id, _span_id, _flags = traceparent.split("-")
    assert version == "00", traceparent
    return int(trace_id, 16)


def named(spans, name: str, kind: SpanKind) -> list:
    return [s for s in spans if s.name == name and s.kind == kind]


def is_database(span) -> bool:
    attributes = span.attributes or {}
    return span.kind == SpanKind.CLIENT and any(k.startswith("db.") for k in attributes)


def ancestors(span, by_id: dict) -> list:
    """The span's parents up to its root, nearest first (bounded by the spans we have)."""
    out = []
    for _ in range(len(by_id)):
        if span.parent is None or span.parent.span_id not in by_id:
            break
        span = by_id[span.parent.span_id]
        out.append(span)
    return out


async def test_one_purchase_is_one_trace_across_billing_and_quota(
    spans, quota_and_billing_urls, tmp_path
):
    quota_url, billing_url = quota_and_billing_urls
    q_settings = quota_settings(quota_url, tmp_path, clock="manual", clock_start=START)
    async with running_quota(q_settings) as quota:
        b_settings = billing_settings(billing_url, tmp_path, quota.addr, START)
        async with running_billing(b_settings) as billing:
            calls = billing.calls
            await calls.create_account(ACCOUNT)
            await calls.top_up(ACCOUNT, "300", request_id="fund")
            spans.clear()

            order = await calls.purchase(ACCOUNT, "passport-100k-1y", REGION, "buy-1", WITHIN)
            assert order.state == billing_pb2.ORDER_STATE_FULFILLED

            # The client span ends in the call's done callback: wait until all three are in.
            def wanted(finished):
                return (
                    named(finished, PURCHASE, SpanKind.SERVER)
                    and named(finished, GRANT, SpanKind.CLIENT)
                    and named(finished, GRANT, SpanKind.SERVER)
                )

            async def finished():
                return list(spans.get_finished_spans())

            got = await until(finished, wanted, within=WITHIN, what="the purchase's spans")
            (purchase,) = named(got, PURCHASE, SpanKind.SERVER)
            (grant_client,) = named(got, GRANT, SpanKind.CLIENT)
            (grant_server,) = named(got, GRANT, SpanKind.SERVER)
            trace_id = purchase.context.trace_id
            in_trace = [s for s in got if s.context.trace_id == trace_id]
            by_id = {s.context.span_id: s for s in in_trace}

            # One trace, one root: billing's server span.
            assert [s.name for s in in_trace if s.parent is None] == [PURCHASE]
            assert grant_client.context.trace_id == trace_id
            assert grant_server.context.trace_id == trace_id
            assert grant_server.parent.span_id == grant_client.context.span_id
            assert purchase in ancestors(grant_client, by_id)
            assert grant_server.parent.is_remote

            # Database spans of both services, each under its own server span.
            database = [s for s in in_trace if is_database(s)]
            in_quota = [s for s in database if grant_server in ancestors(s, by_id)]
            in_billing = [s for s in database if s not in in_quota]
            assert in_quota, [s.name for s in in_trace]
            assert in_billing, [s.name for s in in_trace]
            assert all(purchase in ancestors(s, by_id) for s in database)
            statements = " ".join(str(s.attributes.get("db.statement", "")) for s in database)
            assert "orders" in statements and "packages" in statements

            # The events the purchase wrote carry its trace.
            billing_events = await read_events(
                billing.calls.stub,
                billing.calls.admin,
                0,
                ("order_updated",),
                request_type=billing_service_pb2.WatchEventsRequest,
            )
            assert billing_events
            assert {trace_id_of(e.trace_parent) for e in billing_events} == {trace_id}


async def test_a_consumed_event_continues_the_trace_that_wrote_it(spans, tmp_path):
    quota_url = f"sqlite+aiosqlite:///{tmp_path / 'quota.db'}"
    billing_url = f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"
    q_settings = quota_settings(quota_url, tmp_path, clock="manual", clock_start=START)
    async with running_quota(q_settings) as quota:
        b_settings = billing_settings(billing_url, tmp_path, quota.addr, START)
        async with running_billing(b_settings) as billing:
            await billing.calls.create_account(ACCOUNT)
            await billing.calls.top_up(ACCOUNT, "100", request_id="fund")
            q_calls = QuotaCalls(quota)
            spans.clear()

            response = await q_calls.report("ppu-1", ACCOUNT, 1, occur=START)
            assert response.pay_per_use_quantity == 1
            (recorded,) = await read_events(quota.stub, q_calls.admin, 0, (PAY_PER_USE_RECORDED,))
            await billing.caught_up(recorded.sequence)

            async def finished():
                return list(spans.get_finished_spans())

            def consumed(finished):
                return [s for s in finished if s.name == f"consume {PAY_PER_USE_RECORDED}"]

            got = await until(finished, consumed, within=WITHIN, what="the consumer's span")
            (report,) = named(got, REPORT, SpanKind.SERVER)
            assert trace_id_of(recorded.trace_parent) == report.context.trace_id
            (consume,) = consumed(got)
            assert consume.kind == SpanKind.CONSUMER
            assert consume.context.trace_id == report.context.trace_id
            # A child of the span that wrote the event: quota's ReportUsage.
            assert consume.parent.span_id == report.context.span_id
            assert consume.attributes["messaging.message.id"] == recorded.event_id
            assert consume.attributes["allot.event.sequence"] == recorded.sequence
            by_id = {s.context.span_id: s for s in got}
            effect = [s for s in got if is_database(s) and consume in ancestors(s, by_id)]
            assert effect, "billing's statements applying the event are under the consumer span"
            # The streams themselves make no spans (their events carry their trace parents).
            assert not [s for s in got if s.name.endswith("/WatchEvents")]

            # A refused call has its span too, with its status code.
            spans.clear()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await quota.stub.ListPackages(
                    quota_service_pb2.ListPackagesRequest(account_id=ACCOUNT), timeout=WITHIN
                )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            (span,) = await until(
                finished, lambda got: named(got, LIST, SpanKind.SERVER), what="the refused span"
            )
            assert (
                span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
            )
            # (Its span status stays unset: OpenTelemetry marks server spans as errors only
            # for the server's own faults, not for a refused caller.)


async def test_a_service_process_traces_when_otel_says_so(tmp_path):
    env = quota_env(
        f"sqlite+aiosqlite:///{tmp_path / 'quota.db'}",
        tmp_path,
        OTEL_TRACES_EXPORTER="console",
        OTEL_SERVICE_NAME="quota-under-test",
    )
    with quota_process(env, tmp_path / "quota.log") as process:
        async with grpc.aio.insecure_channel(process.addr) as channel:
            calls = quota_calls(channel)
            await calls.list_packages(ACCOUNT)
        process.send_signal()
        assert process.wait(30) == 0, process.log_text()
        printed = "".join(process.printed())
    assert '"name": "/allot.quota.v1.QuotaService/ListPackages"' in printed, process.log_text()
    assert '"service.name": "quota-under-test"' in printed
    assert '"db.statement": "SELECT' in printed
    assert "WatchEvents" not in printed and "grpc.health" not in printed
