"""Rate limits in admission (docs/design/deduction-order.md, "Rate limits"): a token bucket per
account × region × API in the regional database, exact across replicas; the catalog's limit,
an admin's override that beats it, and a call with no limit that never touches a bucket.

Two in-process quota servers on one database (a SQLite file, and PostgreSQL) are two replicas
of one region: nothing but the database is shared between them. Both run the manual clock at
the same instant, so "one second" is exactly that and refill happens only when a test moves
both clocks.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest
from allot.quota.v1 import quota_pb2, quota_service_pb2

from services.quota.app.rate_limits import REFRESH_SECONDS
from tests.support.calls import expect_error
from tests.support.databases import DirectReader
from tests.support.quota import (
    ACCOUNT,
    API,
    OTHER_ACCOUNT,
    OTHER_API,
    REGION,
    QuotaCalls,
    quota_server,
)

RATE_LIMITED = quota_service_pb2.DENY_REASON_RATE_LIMITED
NOT_SUBSCRIBED = quota_service_pb2.DENY_REASON_API_NOT_SUBSCRIBED
CATALOG_LIMIT = 5  # passport's rate_limit_per_second below; id-card has none
CALL_TIMEOUT = 30.0

CATALOG = f"""\
currency: USD
regions:
  - {{id: {REGION}, name: CN-Hong Kong}}
  - {{id: ap-southeast-2, name: AP-Bangkok}}
apis:
  - id: {API}
    name: Passport OCR
    rate_limit_per_second: {CATALOG_LIMIT}
    price_tiers:
      - {{unit_price: "0.0025"}}
  - id: {OTHER_API}
    name: ID Card OCR
    price_tiers:
      - {{unit_price: "0.0020"}}
offers: []
"""


@pytest.fixture
async def replicas(database_url, tmp_path):
    """Two quota servers on one database, started one after the other (the first migrates)."""
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG)
    async with (
        quota_server(database_url, tmp_path, catalog=str(catalog)) as a,
        quota_server(database_url, tmp_path, catalog=str(catalog)) as b,
    ):
        for api in (API, OTHER_API):
            for account in (ACCOUNT, OTHER_ACCOUNT):
                await a.enable(account, api)
        yield a, b


async def checks(calls: list[QuotaCalls], account: str = ACCOUNT, api: str = API):
    """One CheckQuota per entry of `calls`, all at once."""
    return await asyncio.wait_for(
        asyncio.gather(*(c.check(account, api=api) for c in calls)), CALL_TIMEOUT
    )


def admitted(responses) -> int:
    return sum(r.allowed for r in responses)


async def advance(replicas, delta: timedelta) -> None:
    for calls in replicas:
        await calls.advance(delta)


async def test_twenty_concurrent_checks_on_two_replicas_admit_exactly_the_limit(replicas):
    a, b = replicas
    responses = await checks([a, b] * 10)

    assert admitted(responses) == CATALOG_LIMIT
    denied = [r for r in responses if not r.allowed]
    assert len(denied) == 20 - CATALOG_LIMIT
    assert all(r.deny_reason == RATE_LIMITED for r in denied)
    # The bucket is empty and the clock stands still: one call's token is 1/5 s away.
    assert {r.retry_after.ToTimedelta() for r in denied} == {timedelta(milliseconds=200)}
    assert all(not r.HasField("retry_after") for r in responses if r.allowed)

    # A retry after retry_after is admitted, once, whichever replica it reaches first.
    await advance(replicas, timedelta(milliseconds=200))
    assert admitted(await checks([a, b, a, b])) == 1
    # A quiet spell refills the bucket up to its burst (5), not beyond.
    await advance(replicas, timedelta(seconds=10))
    assert admitted(await checks([b, a] * 5)) == CATALOG_LIMIT


async def test_a_partly_refilled_bucket_says_when_the_next_token_comes(replicas):
    a, _ = replicas
    assert admitted(await checks([a] * CATALOG_LIMIT)) == CATALOG_LIMIT
    await advance(replicas, timedelta(milliseconds=150))  # 0.75 of a token
    [response] = await checks([a])
    assert response.deny_reason == RATE_LIMITED
    assert response.retry_after.ToTimedelta() == timedelta(milliseconds=50)


async def test_limits_are_per_account_and_api(replicas, database_url):
    a, b = replicas
    assert admitted(await checks([a, b] * 5)) == CATALOG_LIMIT
    assert admitted(await checks([a, b] * 5, account=OTHER_ACCOUNT)) == CATALOG_LIMIT
    # No limit in the catalog and no override: every call is admitted, and no bucket exists.
    assert admitted(await checks([a, b] * 10, api=OTHER_API)) == 20
    reader = DirectReader(database_url)
    try:
        assert (
            await reader.scalar(
                f"SELECT COUNT(*) FROM rate_limit_buckets WHERE api = '{OTHER_API}'"
            )
            == 0
        )
    finally:
        await reader.dispose()


async def test_a_call_denied_for_another_reason_takes_no_token(replicas):
    a, _ = replicas
    await a.disable(ACCOUNT, API)
    responses = await checks([a] * 10)
    assert {r.deny_reason for r in responses} == {NOT_SUBSCRIBED}
    await a.enable(ACCOUNT, API)
    assert admitted(await checks([a] * 10)) == CATALOG_LIMIT


async def test_report_usage_is_not_rate_limited(replicas):
    a, b = replicas
    reports = [c.report(f"ev-{i}") for i, c in enumerate([a, b] * 5)]
    results = await asyncio.wait_for(asyncio.gather(*reports), CALL_TIMEOUT)
    assert sum(r.pay_per_use_quantity for r in results) == 10  # all recorded, no package
    # ... and took no token: admission still has the whole burst.
    assert admitted(await checks([a, b] * 5)) == CATALOG_LIMIT


async def test_an_override_beats_the_catalog_and_clearing_it_restores_the_catalog(replicas):
    a, b = replicas
    limit = await a.set_rate_limit(2, burst=3)
    assert (limit.per_second, limit.burst, limit.source) == (
        2,
        3,
        quota_pb2.RATE_LIMIT_SOURCE_OVERRIDE,
    )
    assert limit.HasField("update_time")
    assert await b.get_rate_limit() == limit

    responses = await checks([a] * 6)
    assert admitted(responses) == 3  # the override's burst, not the catalog's 5
    assert {r.retry_after.ToTimedelta() for r in responses if not r.allowed} == {
        timedelta(milliseconds=500)
    }
    # The other account keeps the catalog's limit.
    assert admitted(await checks([a] * 10, account=OTHER_ACCOUNT)) == CATALOG_LIMIT

    cleared = await a.set_rate_limit(0)
    assert (cleared.per_second, cleared.burst, cleared.source) == (
        CATALOG_LIMIT,
        CATALOG_LIMIT,
        quota_pb2.RATE_LIMIT_SOURCE_CATALOG,
    )
    assert not cleared.HasField("update_time")
    await advance(replicas, timedelta(seconds=1))
    assert admitted(await checks([a] * 10)) == CATALOG_LIMIT


async def test_an_override_limits_an_api_the_catalog_leaves_free(replicas):
    a, b = replicas
    none = await a.get_rate_limit(api=OTHER_API)
    assert (none.per_second, none.source) == (0, quota_pb2.RATE_LIMIT_SOURCE_NONE)

    await a.set_rate_limit(1, api=OTHER_API)
    assert admitted(await checks([a] * 4, api=OTHER_API)) == 1

    # The other replica learns of the override from its copy's refresh, within
    # REFRESH_SECONDS of wall-clock time (bounded wait: twice that and a margin).
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2 * REFRESH_SECONDS + 5
    while True:
        [response] = await checks([b], api=OTHER_API)
        if not response.allowed:
            break
        assert loop.time() < deadline, "the other replica never applied the override"
        await asyncio.sleep(0.1)
    assert response.deny_reason == RATE_LIMITED
    assert response.retry_after.ToTimedelta() == timedelta(seconds=1)


async def test_only_admins_set_rate_limits(replicas):
    a, _ = replicas
    denied = grpc.StatusCode.PERMISSION_DENIED
    for metadata in (a.gateway, a.account(ACCOUNT), a.account(ACCOUNT, read_only=True)):
        await expect_error(a.set_rate_limit(1, metadata=metadata), denied)
    # An account reads its own limit, not another's.
    own = await a.get_rate_limit(metadata=a.account(ACCOUNT, read_only=True))
    assert own.source == quota_pb2.RATE_LIMIT_SOURCE_CATALOG
    await expect_error(a.get_rate_limit(OTHER_ACCOUNT, metadata=a.account(ACCOUNT)), denied)


async def test_set_rate_limit_checks_its_fields_and_is_idempotent(replicas):
    a, _ = replicas
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    await expect_error(a.set_rate_limit(-1), invalid, field="per_second")
    await expect_error(a.set_rate_limit(1_000_001), invalid, field="per_second")
    await expect_error(a.set_rate_limit(0, burst=3), invalid, field="burst")
    await expect_error(a.set_rate_limit(1, burst=-1), invalid, field="burst")
    await expect_error(a.set_rate_limit(1, api="nope"), invalid, "UNKNOWN_API", "api")
    await expect_error(a.set_rate_limit(1, account_id=""), invalid, field="account_id")

    first = await a.set_rate_limit(4, request_id="r-1")
    assert (first.per_second, first.burst) == (4, 4)  # burst 0 = per_second
    await a.advance(timedelta(seconds=1))
    assert await a.set_rate_limit(4, request_id="r-1") == first
    await expect_error(a.set_rate_limit(3, request_id="r-1"), invalid, "REQUEST_ID_REUSED")
