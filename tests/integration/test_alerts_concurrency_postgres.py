"""A threshold crossed by many concurrent reporters fires exactly once
(docs/design/usage-alerts.md, docs/design/scale.md).

Alert evaluation runs in the deduction's transaction and takes the rule's row lock, so with
50 reporters racing past a threshold on PostgreSQL exactly one `threshold_crossed` event
exists per rule. Inside one process concurrent ReportUsage and BatchReportUsage calls share
batch transactions (app/coalescer.py), which would hide the race; so the reporters are spread
over two quota processes on one database (replicas of one regional deployment), and the race is
run both with ReportUsage and with single-event BatchReportUsage calls.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from allot.quota.v1 import quota_pb2, quota_service_pb2, quota_service_pb2_grpc

from tests.support.databases import create_postgres_database, drop_postgres_database
from tests.support.events import THRESHOLD_CROSSED, crossings, events
from tests.support.quota import quota_env, quota_process
from tests.support.servers import Tokens

ACCOUNT = "acct-alert-race"
REGION = "ap-southeast-1"
API = "passport"
PACKAGE_SIZE = 100
USED_BEFORE = 45  # 55 left when the race starts
REPORTERS = 50  # 55 -> 5 left: through 50 (absolute rule) and 40 (40 % rule)
CALL_TIMEOUT = 60.0

TOKENS = Tokens()
ADMIN = TOKENS.md(TOKENS.admin())
GATEWAY = TOKENS.md(TOKENS.gateway())


@pytest.fixture
async def postgres_url():
    url = await create_postgres_database()
    try:
        yield url
    finally:
        await drop_postgres_database(url)


@pytest.fixture
async def replicas(postgres_url, tmp_path):
    """Two quota processes on one PostgreSQL database."""
    with (
        quota_process(quota_env(postgres_url, tmp_path), tmp_path / "quota-a.log") as a,
        quota_process(quota_env(postgres_url, tmp_path), tmp_path / "quota-b.log") as b,
    ):
        async with (
            grpc.aio.insecure_channel(a.addr) as channel_a,
            grpc.aio.insecure_channel(b.addr) as channel_b,
        ):
            yield [
                quota_service_pb2_grpc.QuotaServiceStub(channel_a),
                quota_service_pb2_grpc.QuotaServiceStub(channel_b),
            ]


def usage(event_id: str, quantity: int = 1) -> quota_service_pb2.ReportUsageRequest:
    return quota_service_pb2.ReportUsageRequest(
        event_id=event_id,
        account_id=ACCOUNT,
        user_id="u1",
        region=REGION,
        api=API,
        quantity=quantity,
        http_status=200,
    )


async def prepare(stub) -> tuple[str, str]:
    """A 100-call package with 55 left and two armed rules; returns their alert ids."""
    expire = datetime.now(UTC) + timedelta(days=365)
    await stub.GrantPackage(
        quota_service_pb2.GrantPackageRequest(
            package=quota_pb2.Package(
                account_id=ACCOUNT,
                region=REGION,
                api=API,
                source=quota_pb2.PACKAGE_SOURCE_SUBSCRIPTION,
                total_quantity=PACKAGE_SIZE,
                expire_time={"seconds": int(expire.timestamp())},
            )
        ),
        metadata=ADMIN,
        timeout=CALL_TIMEOUT,
    )
    before = await stub.ReportUsage(usage("before", USED_BEFORE), metadata=GATEWAY, timeout=30)
    assert before.remaining_quantity == PACKAGE_SIZE - USED_BEFORE
    ids = []
    for rule in (
        quota_pb2.UsageAlert(
            account_id=ACCOUNT, region=REGION, api=API, remaining_quantity=50, enabled=True
        ),
        quota_pb2.UsageAlert(
            account_id=ACCOUNT, region=REGION, api="", remaining_percent=40, enabled=True
        ),
    ):
        created = await stub.CreateUsageAlert(
            quota_service_pb2.CreateUsageAlertRequest(usage_alert=rule),
            metadata=ADMIN,
            timeout=CALL_TIMEOUT,
        )
        assert created.state == quota_pb2.USAGE_ALERT_STATE_ARMED
        ids.append(created.alert_id)
    return ids[0], ids[1]


async def assert_fired_once(replicas, absolute: str, percent: str, remainders: list[int]) -> None:
    # The deductions were serialized: each call saw its own remainder, 54 down to 5.
    assert sorted(remainders) == list(range(5, PACKAGE_SIZE - USED_BEFORE))
    for stub in replicas:  # one outbox, seen alike through either replica
        found = await events(stub, ADMIN, types=[THRESHOLD_CROSSED], at_least=2, within=30)
        assert sorted(crossings(found)) == sorted(
            [(absolute, API, 50, PACKAGE_SIZE), (percent, API, 40, PACKAGE_SIZE)]
        )
    for alert_id in (absolute, percent):
        rule = await replicas[1].GetUsageAlert(
            quota_service_pb2.GetUsageAlertRequest(alert_id=alert_id),
            metadata=ADMIN,
            timeout=CALL_TIMEOUT,
        )
        assert rule.state == quota_pb2.USAGE_ALERT_STATE_FIRED


async def test_fifty_concurrent_reports_cross_a_threshold_once(replicas):
    absolute, percent = await prepare(replicas[0])

    async def report(n: int):
        stub = replicas[n % 2]
        return await stub.ReportUsage(usage(f"race-{n:02d}"), metadata=GATEWAY, timeout=60)

    responses = await asyncio.gather(*(report(n) for n in range(REPORTERS)))

    assert all(not r.duplicate and r.pay_per_use_quantity == 0 for r in responses)
    await assert_fired_once(replicas, absolute, percent, [r.remaining_quantity for r in responses])


async def test_fifty_concurrent_single_event_batches_cross_a_threshold_once(replicas):
    """BatchReportUsage is not coalesced: every reporter is its own transaction."""
    absolute, percent = await prepare(replicas[1])

    async def report(n: int):
        stub = replicas[n % 2]
        response = await stub.BatchReportUsage(
            quota_service_pb2.BatchReportUsageRequest(requests=[usage(f"race-{n:02d}")]),
            metadata=GATEWAY,
            timeout=CALL_TIMEOUT,
        )
        (only,) = response.responses
        assert not only.HasField("error"), only.error
        return only

    responses = await asyncio.gather(*(report(n) for n in range(REPORTERS)))

    assert all(r.pay_per_use_quantity == 0 for r in responses)
    await assert_fired_once(replicas, absolute, percent, [r.remaining_quantity for r in responses])
