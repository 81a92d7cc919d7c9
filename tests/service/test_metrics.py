"""Prometheus metrics of real servers (docs/operations.md): RPC counts and latencies by method
and status code, quota's business counters moved only by committed work, the outbox's depth,
and `allot status` reading health and metrics of running services."""

from __future__ import annotations

import asyncio

import grpc
import httpx

from shared import cli
from tests.support.calls import expect_error
from tests.support.events import AlertCalls, alert
from tests.support.metrics import scrape, total, value
from tests.support.notification import notification_settings, running_notification
from tests.support.quota import ACCOUNT, START, quota_server

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
