"""Prometheus metrics of real servers (docs/operations.md): RPC counts and latencies by method
and status code, quota's business counters moved only by committed work, the outbox's depth,
and `allot status` reading health and metrics of running services."""

from __future__ import annotations

import asyncio

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared import cli
from tests.support.billing import billing_settings, running_billing, write_catalog
from tests.support.calls import expect_error
from tests.support.events import AlertCalls, alert
from tests.support.metrics import scrape, total, value
from tests.support.notification import (
    ARREARS,
    EMAIL,
    WEBHOOK,
    notification_settings,
    running_notification,
    until,
)
from tests.support.quota import ACCOUNT, START, quota_server, quota_settings, running_quota
from tests.support.receivers import closed_port, smtp_receiver

QUOTA = "allot.quota.v1.QuotaService"
PORT_0 = "127.0.0.1:0"


async def test_rpc_counts_and_latency_by_method_and_code(database_url, tmp_path):
    async with quota_server(database_url, tmp_path, quota_metrics_addr=PORT_0) as q:
        port = q.handle.server.metrics_endpoint.port
        await q.grant(quantity=5, effective=START)
        await q.report("e1", quantity=2)
        await q.report("e1", quantity=2)  # a duplicate, answered OK
        await expect_error(
            q.report("e2", metadata=(("authorization", "Bearer not-a-token"),)),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        await expect_error(q.report("e3", region="nowhere"), grpc.StatusCode.INVALID_ARGUMENT)
        samples = await scrape(port)

    report = {"service": QUOTA, "method": "ReportUsage"}
    assert value(samples, "allot_rpc_requests_total", **report, code="OK") == 2
    assert value(samples, "allot_rpc_requests_total", **report, code="UNAUTHENTICATED") == 1
    assert value(samples, "allot_rpc_requests_total", **report, code="INVALID_ARGUMENT") == 1
    assert (
        value(samples, "allot_rpc_requests_total", service=QUOTA, method="GrantPackage", code="OK")
        == 1
    )
    # The histogram has the same labels; every call lands in the +Inf bucket.
    assert value(samples, "allot_rpc_duration_seconds_count", **report, code="OK") == 2
    assert value(samples, "allot_rpc_duration_seconds_bucket", **report, code="OK", le="+Inf") == 2
    assert value(samples, "allot_rpc_duration_seconds_sum", **report, code="OK") > 0
    # Quota's counters: one event deducted 2, one report was a repeat.
    assert value(samples, "allot_quota_events_deducted_total") == 1
    assert value(samples, "allot_quota_deducted_quantity_total") == 2
    assert value(samples, "allot_quota_usage_duplicates_total") == 1
    assert value(samples, "allot_quota_pay_per_use_quantity_total") == 0
    assert total(samples, "allot_metrics_refresh_errors_total") == 0


async def test_streams_of_either_style_still_stream_and_are_counted(database_url, tmp_path):
    """gRPC's health Watch writes with `context.write` (not an iterator); it must still stream
    through the metrics interceptor, and be counted when it ends."""
    async with quota_server(database_url, tmp_path, quota_metrics_addr=PORT_0) as q:
        port = q.handle.server.metrics_endpoint.port
        watch = health_pb2_grpc.HealthStub(q.handle.channel).Watch(
            health_pb2.HealthCheckRequest(service="")
        )
        first = await asyncio.wait_for(watch.read(), 10)
        watch.cancel()
        samples = await until(
            lambda: scrape(port),
            lambda s: total(s, "allot_rpc_requests_total", method="Watch") == 1,
            10,
            "the ended health Watch in the metrics",
        )
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    assert total(samples, "allot_rpc_requests_total", service="grpc.health.v1.Health") == 1


async def test_business_counters_and_outbox_depth(database_url, tmp_path):
    async with quota_server(database_url, tmp_path, quota_metrics_addr=PORT_0) as q:
        port = q.handle.server.metrics_endpoint.port
        alerts = AlertCalls(q)
        await q.grant(quantity=10, effective=START)
        await alerts.create_alert(alert(quantity=5), request_id="alert-1")
        before = await scrape(port)
        await q.report("u1", quantity=6)  # 4 left: the alert at 5 fires
        await q.report("u2", quantity=7)  # 4 from the package, 3 pay-per-use
        after = await scrape(port)

    assert value(after, "allot_quota_threshold_crossings_total") == 1
    assert value(after, "allot_quota_events_deducted_total") == 2
    assert value(after, "allot_quota_deducted_quantity_total") == 10
    assert value(after, "allot_quota_pay_per_use_quantity_total") == 3
    # The crossing, the package's exhaustion and the pay-per-use record are events.
    assert value(after, "allot_outbox_depth") >= value(before, "allot_outbox_depth") + 3


async def test_billing_counts_orders_by_kind_and_state_after_commit(
    quota_and_billing_urls, tmp_path
):
    """A purchase enters PENDING then FULFILLED; a refused one (no balance) is no order."""
    quota_url, billing_url = quota_and_billing_urls
    catalog = str(write_catalog(tmp_path))
    for name in ("quota", "billing"):
        (tmp_path / name).mkdir()
    quota_at = quota_settings(
        quota_url, tmp_path / "quota", clock="manual", clock_start=START, catalog=catalog
    )
    async with running_quota(quota_at) as quota:
        billing_at = billing_settings(
            billing_url,
            tmp_path / "billing",
            quota.addr,
            START,
            catalog=catalog,
            billing_metrics_addr=PORT_0,
        )
        async with running_billing(billing_at) as billing:
            port = billing.server.metrics_endpoint.port
            calls = billing.calls
            await calls.create_account("metered")
            await expect_error(
                calls.purchase("metered", "passport-100-1y", "ap-southeast-1", "p0", 20),
                grpc.StatusCode.FAILED_PRECONDITION,
                reason="INSUFFICIENT_BALANCE",
            )
            await calls.top_up("metered", "5.00")
            order = await calls.purchase("metered", "passport-100-1y", "ap-southeast-1", "p1", 20)
            samples = await scrape(port)

    assert order.package_id
    purchase = {"kind": "PURCHASE"}
    assert value(samples, "allot_billing_orders_total", **purchase, state="PENDING") == 1
    assert value(samples, "allot_billing_orders_total", **purchase, state="FULFILLED") == 1
    assert total(samples, "allot_billing_orders_total") == 2
    assert (
        value(
            samples,
            "allot_rpc_requests_total",
            service="allot.billing.v1.BillingService",
            method="PurchasePackage",
            code="FAILED_PRECONDITION",
        )
        == 1
    )


async def test_notification_counts_deliveries_sent_and_retries(database_url, tmp_path):
    """A test mail reaches a real SMTP server (SENT); a webhook to a closed port fails its first
    attempt and is scheduled again (a retry, not yet FAILED)."""
    with smtp_receiver() as smtp:
        settings = notification_settings(
            database_url,
            tmp_path,
            f"127.0.0.1:{closed_port()}",
            smtp_url=smtp.url(),
            notification_metrics_addr=PORT_0,
        )
        async with running_notification(settings) as handle:
            port = handle.server.metrics_endpoint.port
            n = handle.calls
            mail = await n.create(ACCOUNT, EMAIL, "ops@example.com", [ARREARS])
            hook = await n.create(
                ACCOUNT, WEBHOOK, f"http://127.0.0.1:{closed_port()}/hook", [ARREARS]
            )
            await n.send_test(mail.contact_id)
            await n.send_test(hook.contact_id)
            samples = await until(
                lambda: scrape(port),
                lambda s: (
                    total(s, "allot_notification_deliveries_total") >= 1
                    and total(s, "allot_notification_delivery_retries_total") >= 1
                ),
                20,
                "a sent mail and a webhook retry in the metrics",
            )

    assert value(samples, "allot_notification_deliveries_total", channel="EMAIL", state="SENT") == 1
    assert value(samples, "allot_notification_delivery_retries_total", channel="WEBHOOK") == 1
    assert total(samples, "allot_notification_deliveries_total", state="FAILED") == 0


async def test_a_batch_counts_each_event_once(database_url, tmp_path):
    """An id twice in one batch is one event deducted and one repeat."""
    async with quota_server(database_url, tmp_path, quota_metrics_addr=PORT_0) as q:
        port = q.handle.server.metrics_endpoint.port
        await q.grant(quantity=10, effective=START)
        answer = await q.batch([q.usage("b1", quantity=1), q.usage("b1", quantity=1)])
        samples = await scrape(port)
    assert [r.duplicate for r in answer.responses] == [False, True]
    assert value(samples, "allot_quota_events_deducted_total") == 1
    assert value(samples, "allot_quota_deducted_quantity_total") == 1
    assert value(samples, "allot_quota_usage_duplicates_total") == 1


async def test_other_paths_are_not_found(tmp_path):
    async with quota_server(
        f"sqlite+aiosqlite:///{tmp_path / 'q.db'}", tmp_path, quota_metrics_addr=PORT_0
    ) as q:
        port = q.handle.server.metrics_endpoint.port
        async with httpx.AsyncClient(timeout=5.0) as client:
            missing = await client.get(f"http://127.0.0.1:{port}/other")
            found = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert missing.status_code == 404
    assert found.status_code == 200
    assert found.headers["content-type"].startswith("text/plain")


async def test_allot_status_reads_running_services(tmp_path, monkeypatch, capsys):
    quota_url = f"sqlite+aiosqlite:///{tmp_path / 'quota.db'}"
    async with quota_server(quota_url, tmp_path, quota_metrics_addr=PORT_0) as q:
        await q.grant(quantity=3, effective=START)
        await q.report("s1", quantity=5)  # pay-per-use: an event in quota's outbox
        settings = notification_settings(
            f"sqlite+aiosqlite:///{tmp_path / 'notification.db'}",
            tmp_path,
            q.handle.addr,
            notification_metrics_addr=PORT_0,
        )
        async with running_notification(settings) as n:
            env = {
                "ALLOT_QUOTA_ADDR": q.handle.addr,
                "ALLOT_QUOTA_METRICS_ADDR": f"127.0.0.1:{q.handle.server.metrics_endpoint.port}",
                "ALLOT_NOTIFICATION_ADDR": n.server.bound_addr,
                "ALLOT_NOTIFICATION_METRICS_ADDR": (f"127.0.0.1:{n.server.metrics_endpoint.port}"),
                # Billing is not running: status says so and exits 1.
                "ALLOT_BILLING_ADDR": "127.0.0.1:1",
                "ALLOT_BILLING_METRICS_ADDR": "",
            }
            for name, setting in env.items():
                monkeypatch.setenv(name, setting)
            code = await asyncio.to_thread(cli.main, ["status"])
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line and line[0] != " "}
    assert code == 1
    assert "SERVING" in lines["quota"].split()
    assert "SERVING" in lines["notification"].split()
    assert "UNREACHABLE" in lines["billing"]
    assert int(lines["quota"].split()[-1]) >= 1  # the outbox depth
    assert "metrics off" in out
    assert "deliveries: 0 pending, 0 failed" in out
    assert "stream quota" in out and "cursor" in out and ACCOUNT not in out
