"""GetUsageStats: an account's usage per UTC minute or hour, or per day of the billing time
zone, split into successful and failed calls and into package and pay-per-use quantities.

Every scenario runs twice on each database: through the RPC of a real server (`rpc`), and
through the use case called directly on a migrated database (`use_case`), with the same
events and the same expected buckets, so the two can never drift apart.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import pytest
from allot.quota.v1 import quota_pb2, quota_service_pb2

from services.quota.app import packages, stats, usage
from services.quota.service import QuotaService
from shared.errors import AllotError, InvalidArgument
from shared.migrations import upgrade
from shared.server import build_runtime
from tests.support.calls import expect_error, ts
from tests.support.quota import (
    ACCOUNT,
    API,
    END_OF_YEAR,
    OTHER_ACCOUNT,
    OTHER_API,
    OTHER_REGION,
    REGION,
    START,
    SUBSCRIPTION,
    QuotaCalls,
    quota_server,
    quota_settings,
)

MINUTE = quota_pb2.STATS_GRANULARITY_MINUTE
HOUR = quota_pb2.STATS_GRANULARITY_HOUR
DAY = quota_pb2.STATS_GRANULARITY_DAY
INVALID = grpc.StatusCode.INVALID_ARGUMENT
SHANGHAI = "Asia/Shanghai"
# Events are reported once the clock is here, so none of them lies in the future.
NOW = "2025-01-01T00:00:00Z"
RANGE = {"start": "2024-01-01T00:00:00Z", "end": "2024-01-02T00:00:00Z"}

# (bucket start, successful_calls, failed_calls, package_quantity, pay_per_use_quantity)
Row = tuple[str, int, int, int, int]


@dataclass(frozen=True)
class Event:
    event_id: str
    occur: str
    quantity: int = 1
    http_status: int = 200
    account_id: str = ACCOUNT
    region: str = REGION
    api: str = API


# A package of 5 calls of passport (effective at START) pays for the first billable ones.
PACKAGE_QUANTITY = 5
EVENTS = [
    Event("e1", "2024-01-01T00:00:10Z", 3),  # package 3
    Event("e2", "2024-01-01T00:00:50Z", 1, http_status=500),  # failed, free
    Event("e3", "2024-01-01T00:01:00Z", 4),  # package 2, pay-per-use 2
    Event("e4", "2024-01-01T01:30:00Z", 2, http_status=404),
    Event("e5", "2024-01-01T15:59:59Z", 5),  # 23:59:59 in Shanghai
    Event("e6", "2024-01-01T16:00:00Z", 7, http_status=201),  # 00:00:00 the next day there
    Event("other-api", "2024-01-01T00:00:30Z", 10, api=OTHER_API),
    Event("other-account", "2024-01-01T00:00:20Z", 100, account_id=OTHER_ACCOUNT),
    Event("other-region", "2024-01-01T00:00:40Z", 1000, region=OTHER_REGION),
    Event("before-range", "2023-12-31T23:59:59Z", 50),  # Shanghai's 2024-01-01 all the same
    Event("at-range-end", "2024-01-02T00:00:00Z", 500),
]


def rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S") + (
        f".{value.microsecond:06d}Z" if value.microsecond else "Z"
    )


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def reporting_times(events: list[Event]):
    """(clock, event) in the given order, the clock moved forward to each event as it happens:
    usage is accepted at most 45 days late (docs/security.md), and the statistics are read
    at NOW, long after."""
    clock = at("2024-01-01T00:00:00Z")
    for e in events:
        clock = max(clock, at(e.occur))
        yield clock, e


# --- the two ways in -----------------------------------------------------------------------


class ViaRpc:
    """Events through ReportUsage, statistics through GetUsageStats, on a real server."""

    def __init__(self, calls: QuotaCalls) -> None:
        self.q = calls

    async def grant(self, quantity: int) -> None:
        await self.q.grant(quantity=quantity, effective=START, expire=END_OF_YEAR)

    async def report(self, events: list[Event]) -> None:
        for clock, e in reporting_times(events):
            await self.q.set_time(clock)
            await self.q.report(
                e.event_id,
                e.account_id,
                e.quantity,
                http_status=e.http_status,
                region=e.region,
                api=e.api,
                occur=e.occur,
            )
        await self.q.set_time(NOW)

    def call(self, *, start=RANGE["start"], end=RANGE["end"], metadata=None, **fields):
        request = quota_service_pb2.GetUsageStatsRequest(
            account_id=fields.get("account_id", ACCOUNT),
            region=fields.get("region", REGION),
            api=fields.get("api", API),
            granularity=fields.get("granularity", DAY),
        )
        if start is not None:
            request.start_time.CopyFrom(ts(start))
        if end is not None:
            request.end_time.CopyFrom(ts(end))
        return self.q.stub.GetUsageStats(request, metadata=metadata or self.q.admin)

    async def stats(self, **request) -> list[Row]:
        response = await self.call(**request)
        return [
            (
                rfc3339(b.start_time.ToDatetime(tzinfo=UTC)),
                b.successful_calls,
                b.failed_calls,
                b.package_quantity,
                b.pay_per_use_quantity,
            )
            for b in response.buckets
        ]

    async def expect_invalid(self, field: str, reason: str = "INVALID_FIELD", **request) -> None:
        await expect_error(self.call(**request), INVALID, reason, field)


class ViaUseCase:
    """Events through record_usage, statistics through usage_stats: no server in between."""

    def __init__(self, service: QuotaService) -> None:
        self.service = service
        self.ctx = service.context
        self.tz = service.runtime.settings.tz

    async def grant(self, quantity: int) -> None:
        spec = packages.GrantInput(
            account_id=ACCOUNT,
            region=REGION,
            api=API,
            enterprise_project_id="",
            source=SUBSCRIPTION,
            total_quantity=quantity,
            effective_time=START,
            expire_time=END_OF_YEAR,
            order_id="",
        )
        await self.ctx.db.transaction(lambda uow: packages.grant_package(self.ctx, uow, spec))

    async def report(self, events: list[Event]) -> None:
        for clock, e in reporting_times(events):  # one by one, like ViaRpc
            await self.service.runtime.scheduler.set_time(clock)
            event = usage.UsageInput(
                event_id=e.event_id,
                account_id=e.account_id,
                user_id="user-1",
                region=e.region,
                api=e.api,
                enterprise_project_id="",
                quantity=e.quantity,
                http_status=e.http_status,
                occur_time=at(e.occur),
            )
            [result] = await usage.record_usage(self.ctx, [event])
            assert not isinstance(result, AllotError), result
        await self.service.runtime.scheduler.set_time(at(NOW))

    async def call(self, *, start=RANGE["start"], end=RANGE["end"], **fields):
        return await stats.usage_stats(
            self.ctx,
            self.tz,
            account_id=fields.get("account_id", ACCOUNT),
            region=fields.get("region", REGION),
            api=fields.get("api", API),
            start_time=at(start) if start is not None else None,
            end_time=at(end) if end is not None else None,
            granularity=fields.get("granularity", DAY),
        )

    async def stats(self, **request) -> list[Row]:
        return [
            (
                rfc3339(b.start_time),
                b.successful_calls,
                b.failed_calls,
                b.package_quantity,
                b.pay_per_use_quantity,
            )
            for b in await self.call(**request)
        ]

    async def expect_invalid(self, field: str, reason: str = "INVALID_FIELD", **request) -> None:
        with pytest.raises(InvalidArgument) as caught:
            await self.call(**request)
        assert (caught.value.field, caught.value.reason) == (field, reason)


@pytest.fixture(params=["rpc", "use_case"])
def open_source(request, database_url, tmp_path):
    """Opens a way in (`rpc` or `use_case`) on a fresh database, in a billing time zone."""

    @contextlib.asynccontextmanager
    async def rpc(timezone: str):
        async with quota_server(database_url, tmp_path, timezone=timezone) as calls:
            yield ViaRpc(calls)

    @contextlib.asynccontextmanager
    async def use_case(timezone: str):
        settings = quota_settings(
            database_url,
            tmp_path,
            clock="manual",
            clock_start="2024-01-01T00:00:00Z",
            timezone=timezone,
        )
        runtime = build_runtime(settings, "quota")
        try:
            await upgrade(runtime.db.engine, "quota", QuotaService.migrations_dir)
            yield ViaUseCase(QuotaService(runtime))
        finally:
            await runtime.db.dispose()

    return rpc if request.param == "rpc" else use_case


@pytest.fixture
async def source(open_source):
    """A way in with the default billing time zone (Asia/Shanghai) and EVENTS recorded."""
    async with open_source(SHANGHAI) as s:
        await s.grant(PACKAGE_QUANTITY)
        await s.report(EVENTS)
        yield s


# --- buckets -------------------------------------------------------------------------------


async def test_minute_buckets_split_successful_failed_package_and_pay_per_use(source):
    assert await source.stats(granularity=MINUTE) == [
        ("2024-01-01T00:00:00Z", 3, 1, 3, 0),
        ("2024-01-01T00:01:00Z", 4, 0, 2, 2),
        ("2024-01-01T01:30:00Z", 0, 2, 0, 0),
        ("2024-01-01T15:59:00Z", 5, 0, 0, 5),
        ("2024-01-01T16:00:00Z", 7, 0, 0, 7),
    ]


async def test_hour_buckets_are_aligned_to_utc(source):
    assert await source.stats(granularity=HOUR) == [
        ("2024-01-01T00:00:00Z", 7, 1, 5, 2),
        ("2024-01-01T01:00:00Z", 0, 2, 0, 0),
        ("2024-01-01T15:00:00Z", 5, 0, 0, 5),
        ("2024-01-01T16:00:00Z", 7, 0, 0, 7),
    ]


async def test_day_buckets_start_at_midnight_in_shanghai(source):
    # 15:59:59Z is 23:59:59 on 2024-01-01 in Shanghai, 16:00:00Z is 00:00 on 2024-01-02.
    # The first day began at 2023-12-31T16:00Z, before the range: only events in it count
    # ("before-range" happened that Shanghai day too, but before start_time).
    assert await source.stats(granularity=DAY) == [
        ("2023-12-31T16:00:00Z", 12, 3, 5, 7),
        ("2024-01-01T16:00:00Z", 7, 0, 0, 7),
    ]


async def test_empty_api_sums_every_api_of_the_region(source):
    assert await source.stats(granularity=MINUTE, api="") == [
        ("2024-01-01T00:00:00Z", 13, 1, 3, 10),
        ("2024-01-01T00:01:00Z", 4, 0, 2, 2),
        ("2024-01-01T01:30:00Z", 0, 2, 0, 0),
        ("2024-01-01T15:59:00Z", 5, 0, 0, 5),
        ("2024-01-01T16:00:00Z", 7, 0, 0, 7),
    ]
    assert await source.stats(granularity=DAY, api=OTHER_API) == [
        ("2023-12-31T16:00:00Z", 10, 0, 0, 10),
    ]


async def test_only_the_account_and_region_asked_for(source):
    assert await source.stats(account_id=OTHER_ACCOUNT, api="") == [
        ("2023-12-31T16:00:00Z", 100, 0, 0, 100),
    ]
    assert await source.stats(region=OTHER_REGION, api="") == [
        ("2023-12-31T16:00:00Z", 1000, 0, 0, 1000),
    ]
    assert await source.stats(account_id="acct-nobody", api="") == []


async def test_start_is_inclusive_end_exclusive_and_buckets_keep_their_aligned_start(source):
    # e1 (00:00:10) is before the start, e3 (00:01:00) at the end: only e2 is counted.
    window = {"start": "2024-01-01T00:00:30Z", "end": "2024-01-01T00:01:00Z"}
    assert await source.stats(granularity=MINUTE, **window) == [
        ("2024-01-01T00:00:00Z", 0, 1, 0, 0),
    ]
    assert await source.stats(
        granularity=HOUR, start="2024-01-02T00:00:00Z", end="2024-01-02T00:00:00.000001Z"
    ) == [("2024-01-02T00:00:00Z", 500, 0, 0, 500)]
    assert await source.stats(start="2024-06-01T00:00:00Z", end="2024-06-02T00:00:00Z") == []


async def test_day_buckets_follow_dst_in_the_billing_time_zone(open_source):
    async with open_source("America/New_York") as s:
        await s.report(
            [
                Event("ny-1", "2024-03-10T04:59:59Z", 1),  # 03-09 23:59:59 EST
                Event("ny-2", "2024-03-10T05:00:00Z", 2),  # 03-10 00:00 EST
                Event("ny-3", "2024-03-11T03:59:59Z", 4),  # 03-10 23:59:59 EDT: a 23 h day
                Event("ny-4", "2024-03-11T04:00:00Z", 8),  # 03-11 00:00 EDT
                Event("ny-5", "2024-11-04T04:30:00Z", 16),  # 11-03 23:30 EST: a 25 h day
                Event("ny-6", "2024-11-04T05:00:00Z", 32),  # 11-04 00:00 EST
            ]
        )

        assert await s.stats(start="2024-03-01T00:00:00Z", end="2024-12-01T00:00:00Z") == [
            ("2024-03-09T05:00:00Z", 1, 0, 0, 1),
            ("2024-03-10T05:00:00Z", 6, 0, 0, 6),
            ("2024-03-11T04:00:00Z", 8, 0, 0, 8),
            ("2024-11-03T04:00:00Z", 16, 0, 0, 16),
            ("2024-11-04T05:00:00Z", 32, 0, 0, 32),
        ]


# --- validation ----------------------------------------------------------------------------


async def test_malformed_requests_name_the_field(source, subtests):
    week_of_minutes = {"start": "2024-01-01T00:00:00Z", "end": "2024-01-07T22:41:00Z"}
    cases = [
        ("account_id", "INVALID_FIELD", {"account_id": ""}),
        ("account_id", "INVALID_FIELD", {"account_id": "no spaces"}),
        ("region", "INVALID_FIELD", {"region": ""}),
        ("region", "UNKNOWN_REGION", {"region": "mars-1"}),
        ("api", "UNKNOWN_API", {"api": "telepathy"}),
        ("start_time", "INVALID_FIELD", {"start": None}),
        ("end_time", "INVALID_FIELD", {"end": None}),
        ("end_time", "INVALID_FIELD", {"end": RANGE["start"]}),
        ("end_time", "INVALID_FIELD", {"start": RANGE["end"], "end": RANGE["start"]}),
        ("granularity", "INVALID_FIELD", {"granularity": 0}),
        ("granularity", "INVALID_FIELD", {"granularity": 4}),
        # 10,001 minutes: more buckets than one request may span.
        ("end_time", "INVALID_FIELD", {"granularity": MINUTE, **week_of_minutes}),
        ("end_time", "INVALID_FIELD", {"start": "2000-01-01T00:00:00Z", "granularity": HOUR}),
    ]
    for field, reason, request in cases:
        with subtests.test(field=field, request=request):
            await source.expect_invalid(field, reason, **request)
    # 10,000 minutes is still fine.
    await source.stats(
        granularity=MINUTE, start=week_of_minutes["start"], end="2024-01-07T22:40:00Z"
    )


# --- who may read (RPC only: the token decides) --------------------------------------------


@pytest.fixture
async def rpc(database_url, tmp_path):
    async with quota_server(database_url, tmp_path) as calls:
        via = ViaRpc(calls)
        await via.grant(PACKAGE_QUANTITY)
        await via.report(EVENTS)
        yield via


async def test_an_account_reads_its_own_stats_and_never_another_accounts(rpc):
    own = rpc.q.account(ACCOUNT, read_only=True)

    assert await rpc.stats(metadata=own) == [
        ("2023-12-31T16:00:00Z", 12, 3, 5, 7),
        ("2024-01-01T16:00:00Z", 7, 0, 0, 7),
    ]
    # An empty account_id means the caller's own account.
    assert await rpc.stats(metadata=own, account_id="") == await rpc.stats(metadata=own)
    await expect_error(
        rpc.call(metadata=own, account_id=OTHER_ACCOUNT),
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
