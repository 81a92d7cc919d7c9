"""Concurrent usage against one package on PostgreSQL, through a real quota process.

Many gateway calls race for the last units of one package: they must take exactly what the
package holds, the rest must become pay-per-use, and replaying every event must change nothing
(docs/design/deduction-order.md, "Exactly once"). Within one process concurrent ReportUsage and
BatchReportUsage calls share batch transactions (app/coalescer.py), so the race between
transactions is also run across two replicas on one database, where only row locks keep the
count right (docs/design/scale.md). Concurrent grants with one request_id must create one package
(AIP-155).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from allot.quota.v1 import quota_pb2, quota_service_pb2, quota_service_pb2_grpc

from tests.support.databases import create_postgres_database, drop_postgres_database
from tests.support.quota import quota_env, quota_process
from tests.support.servers import Tokens

ACCOUNT = "acct-race"
REGION = "ap-southeast-1"
API = "passport"
PACKAGE_SIZE = 150
EVENTS = 200
CALL_TIMEOUT = 60.0


@pytest.fixture
async def postgres_url():
    url = await create_postgres_database()
    try:
        yield url
    finally:
        await drop_postgres_database(url)


@pytest.fixture
async def stub(postgres_url, tmp_path):
    env = quota_env(postgres_url, tmp_path)
    with quota_process(env, tmp_path / "quota.log") as process:
        async with grpc.aio.insecure_channel(process.addr) as channel:
            yield quota_service_pb2_grpc.QuotaServiceStub(channel)


@pytest.fixture
async def replicas(postgres_url, tmp_path):
    """Two quota processes on one database, as replicas of one regional deployment
    (docs/design/scale.md): only the database's row locks keep them apart."""
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


TOKENS = Tokens()
ADMIN = TOKENS.md(TOKENS.admin())
GATEWAY = TOKENS.md(TOKENS.gateway())


def grant_request(request_id: str, quantity: int = PACKAGE_SIZE):
    expire = datetime.now(UTC) + timedelta(days=365)
    return quota_service_pb2.GrantPackageRequest(
        request_id=request_id,
        package=quota_pb2.Package(
            account_id=ACCOUNT,
            region=REGION,
            api=API,
            source=quota_pb2.PACKAGE_SOURCE_SUBSCRIPTION,
            total_quantity=quantity,
            # Whole seconds, so twin requests built a moment apart carry the same content.
            expire_time={"seconds": int(expire.timestamp())},
        ),
    )


def usage(event_id: str) -> quota_service_pb2.ReportUsageRequest:
    return quota_service_pb2.ReportUsageRequest(
        event_id=event_id,
        account_id=ACCOUNT,
        user_id="u1",
        region=REGION,
        api=API,
        quantity=1,
        http_status=200,
    )


def without_duplicate(response: quota_service_pb2.ReportUsageResponse):
    copy = quota_service_pb2.ReportUsageResponse()
    copy.CopyFrom(response)
    copy.duplicate = False
    return copy


def assert_exact_split(responses, package_id: str) -> None:
    """150 events took one unit each from the package, in some order; 50 paid per use."""
    assert all(not r.HasField("error") for r in responses), [r.error for r in responses]
    assert not any(r.duplicate for r in responses)
    paid = [r for r in responses if r.deductions]
    per_use = [r for r in responses if not r.deductions]
    assert len(paid) == PACKAGE_SIZE
    assert all(
        [(d.package_id, d.quantity) for d in r.deductions] == [(package_id, 1)]
        and r.pay_per_use_quantity == 0
        for r in paid
    )
    assert sum(d.quantity for r in responses for d in r.deductions) == PACKAGE_SIZE
    assert len(per_use) == EVENTS - PACKAGE_SIZE
    assert sum(r.pay_per_use_quantity for r in responses) == EVENTS - PACKAGE_SIZE
    # The deductions were serialized: each saw a different remainder, down to 0.
    assert sorted(r.remaining_quantity for r in paid) == list(range(PACKAGE_SIZE))
    assert all(r.remaining_quantity == 0 for r in per_use)


async def assert_package_used_up(stub, package_id: str) -> None:
    package = await stub.GetPackage(
        quota_service_pb2.GetPackageRequest(package_id=package_id),
        metadata=ADMIN,
        timeout=CALL_TIMEOUT,
    )
    assert package.used_quantity == PACKAGE_SIZE
    assert package.remaining_quantity == 0
    assert package.state == quota_pb2.PACKAGE_STATE_EXHAUSTED
    summary = await stub.GetQuotaSummary(
        quota_service_pb2.GetQuotaSummaryRequest(account_id=ACCOUNT, region=REGION, api=API),
        metadata=ADMIN,
        timeout=CALL_TIMEOUT,
    )
    [item] = summary.items
    assert (item.total_quantity, item.used_quantity, item.remaining_quantity) == (
        PACKAGE_SIZE,
        PACKAGE_SIZE,
        0,
    )


async def test_concurrent_reports_take_exactly_the_package(stub):
    package = await stub.GrantPackage(grant_request("grant-1"), metadata=ADMIN, timeout=30)
    ids = [f"evt-{i:03d}" for i in range(EVENTS)]

    async def report(event_id: str):
        return await stub.ReportUsage(usage(event_id), metadata=GATEWAY, timeout=CALL_TIMEOUT)

    first = await asyncio.gather(*(report(i) for i in ids))
    assert [r.event_id for r in first] == ids
    assert_exact_split(first, package.package_id)
    await assert_package_used_up(stub, package.package_id)

    again = await asyncio.gather(*(report(i) for i in ids))
    assert all(r.duplicate for r in again)
    for original, replay in zip(first, again, strict=True):
        assert without_duplicate(replay) == original
    await assert_package_used_up(stub, package.package_id)


async def test_two_replicas_take_exactly_the_package(replicas):
    package = await replicas[0].GrantPackage(grant_request("grant-1"), metadata=ADMIN, timeout=30)
    ids = [f"evt-{i:03d}" for i in range(EVENTS)]

    async def report(n: int, event_id: str, shift: int = 0):
        stub = replicas[(n + shift) % 2]
        return await stub.ReportUsage(usage(event_id), metadata=GATEWAY, timeout=CALL_TIMEOUT)

    first = await asyncio.gather(*(report(n, i) for n, i in enumerate(ids)))
    assert [r.event_id for r in first] == ids
    assert_exact_split(first, package.package_id)
    for stub in replicas:
        await assert_package_used_up(stub, package.package_id)

    # Each event replayed on the other replica than the one that recorded it.
    again = await asyncio.gather(*(report(n, i, shift=1) for n, i in enumerate(ids)))
    assert all(r.duplicate for r in again)
    for original, replay in zip(first, again, strict=True):
        assert without_duplicate(replay) == original
    await assert_package_used_up(replicas[1], package.package_id)


async def test_concurrent_batches_take_exactly_the_package(stub):
    package = await stub.GrantPackage(grant_request("grant-1"), metadata=ADMIN, timeout=30)
    batches = [[f"b{b:02d}-evt-{i:02d}" for i in range(20)] for b in range(EVENTS // 20)]

    async def report(batch: list[str]):
        response = await stub.BatchReportUsage(
            quota_service_pb2.BatchReportUsageRequest(requests=[usage(i) for i in batch]),
            metadata=GATEWAY,
            timeout=CALL_TIMEOUT,
        )
        assert [r.event_id for r in response.responses] == batch
        return list(response.responses)

    first = await asyncio.gather(*(report(b) for b in batches))
    assert_exact_split([r for batch in first for r in batch], package.package_id)
    # Events of one batch are applied in order, so within a batch remainders only go down.
    for batch in first:
        remainders = [r.remaining_quantity for r in batch]
        assert remainders == sorted(remainders, reverse=True)
    await assert_package_used_up(stub, package.package_id)

    again = await asyncio.gather(*(report(b) for b in batches))
    for original_batch, replay_batch in zip(first, again, strict=True):
        assert all(r.duplicate for r in replay_batch)
        for original, replay in zip(original_batch, replay_batch, strict=True):
            assert without_duplicate(replay) == original
    await assert_package_used_up(stub, package.package_id)


async def test_concurrent_grants_with_one_request_id_create_one_package(replicas):
    """20 retries of one grant at once, spread over two replicas: one package."""
    request = grant_request("order-42", quantity=1000)
    responses = await asyncio.gather(
        *(
            replicas[n % 2].GrantPackage(request, metadata=ADMIN, timeout=CALL_TIMEOUT)
            for n in range(20)
        )
    )
    assert len({r.package_id for r in responses}) == 1
    assert all(r == responses[0] for r in responses)
    listed = await replicas[0].ListPackages(
        quota_service_pb2.ListPackagesRequest(account_id=ACCOUNT, page_size=100),
        metadata=ADMIN,
        timeout=CALL_TIMEOUT,
    )
    assert [p.package_id for p in listed.packages] == [responses[0].package_id]
    assert listed.packages[0].total_quantity == 1000


async def test_twins_sent_to_two_replicas_at_once_are_recorded_once(replicas):
    """Every event sent to both replicas at the same moment, one-by-one and in batches: each
    replica's transaction locks the package and looks up the ids in one statement, so the one
    that waited for the other's lock may not see the twin it committed; the event's primary
    key then stops its INSERT and the transaction runs again (docs/faults.md, lost races).
    Each event is recorded once: one answer original, the other a duplicate of it."""
    package = await replicas[0].GrantPackage(
        grant_request("grant-1", quantity=1000), metadata=ADMIN, timeout=30
    )
    ids = [f"twin-{i:03d}" for i in range(60)]

    async def unary(stub, event_id: str):
        return await stub.ReportUsage(usage(event_id), metadata=GATEWAY, timeout=CALL_TIMEOUT)

    async def batch(stub, event_ids: list[str]):
        response = await stub.BatchReportUsage(
            quota_service_pb2.BatchReportUsageRequest(requests=[usage(i) for i in event_ids]),
            metadata=GATEWAY,
            timeout=CALL_TIMEOUT,
        )
        return list(response.responses)

    pairs = await asyncio.gather(
        *(asyncio.gather(unary(replicas[0], i), unary(replicas[1], i)) for i in ids[:30])
    )
    chunks = [ids[30 + n : 35 + n] for n in range(0, 30, 5)]
    batches = await asyncio.gather(
        *(asyncio.gather(batch(replicas[0], c), batch(replicas[1], c)) for c in chunks)
    )
    pairs += [pair for a, b in batches for pair in zip(a, b, strict=True)]
    for a, b in pairs:
        assert not a.HasField("error") and not b.HasField("error"), (a.error, b.error)
        assert sorted([a.duplicate, b.duplicate]) == [False, True]
        assert without_duplicate(a) == without_duplicate(b)
    got = await replicas[1].GetPackage(
        quota_service_pb2.GetPackageRequest(package_id=package.package_id),
        metadata=ADMIN,
        timeout=CALL_TIMEOUT,
    )
    assert got.used_quantity == len(ids)
