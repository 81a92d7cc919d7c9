"""Depletion and forfeiture forecasts (docs/design/forecasts.md): GetQuotaForecast, and the
usage alert conditions on the forecast, evaluated by the due work (run by AdvanceTime before it
returns) and on package changes, edge-triggered on the condition. Every crossing is read from
WatchEvents up to the outbox's head, so "nothing more" is known, not waited out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from allot.quota.v1 import quota_pb2

from tests.support.calls import expect_error
from tests.support.events import ARMED, FIRED, THRESHOLD_CROSSED, AlertCalls, payloads
from tests.support.quota import (
    ACCOUNT,
    API,
    OTHER_ACCOUNT,
    OTHER_API,
    OTHER_REGION,
    REGION,
    START,
    QuotaCalls,
    quota_server,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED
DAY = timedelta(days=1)
END_OF_JANUARY = datetime(2024, 1, 31, 23, 59, 59, tzinfo=UTC)
DEPLETION = quota_pb2.ALERT_CONDITION_DEPLETION_WITHIN_DAYS
FORFEITURE = quota_pb2.ALERT_CONDITION_FORFEITURE_ABOVE_QUANTITY


@pytest.fixture
def q(quota) -> QuotaCalls:
    return QuotaCalls(quota)


@pytest.fixture
def a(q) -> AlertCalls:
    return AlertCalls(q)


class Days:
    """The manual clock, a day at a time from START, with `calls` reported on each day."""

    def __init__(self, q: QuotaCalls) -> None:
        self.q = q
        self.day = 0

    @property
    def now(self) -> datetime:
        return START + self.day * DAY

    async def use(self, calls: int) -> None:
        await self.q.report(f"use-{self.day}-{calls}", quantity=calls, occur=self.now)

    async def next(self) -> None:
        await self.q.advance(DAY)
        self.day += 1


async def crossings(a: AlertCalls) -> list:
    return payloads(await a.log.new(), THRESHOLD_CROSSED)


async def test_used_up_within_7_days_fires_once_rearms_on_a_purchase_and_fires_again(q, a):
    days = Days(q)
    await q.grant(quantity=1_000)
    rule = await a.create(api=API, depletion_days=7)
    assert rule.WhichOneof("threshold") == "depletion_within_days"
    assert rule.depletion_within_days == 7
    assert rule.state == ARMED
    assert await crossings(a) == []  # no usage yet: rate 0, never used up

    # 100 calls a day: 900 left after day 1 (9 days), 800 after day 2 (8 days): armed.
    for _ in range(2):
        await days.use(100)
        assert await crossings(a) == []  # never on the usage path
        await days.next()
        assert await crossings(a) == []
        assert await a.state(rule.alert_id) == ARMED

    # 700 left at 100 a day: used up in exactly 7 days. The due work fires it.
    await days.use(100)
    await days.next()
    (crossed,) = await crossings(a)
    assert (crossed.alert_id, crossed.account_id, crossed.region, crossed.api) == (
        rule.alert_id,
        ACCOUNT,
        REGION,
        API,
    )
    assert crossed.condition == DEPLETION
    assert crossed.WhichOneof("threshold") == "threshold_depletion_days"
    assert crossed.threshold_depletion_days == 7
    assert crossed.daily_rate == "100"
    assert crossed.depletion_time.ToDatetime(UTC) == days.now + 7 * DAY
    assert (crossed.remaining_quantity, crossed.total_quantity) == (700, 1_000)
    assert not crossed.HasField("forfeiture")
    assert await a.state(rule.alert_id) == FIRED

    (forecast,) = (await q.forecast()).forecasts
    assert (forecast.region, forecast.api, forecast.daily_rate) == (REGION, API, "100")
    assert forecast.depletion_time.ToDatetime(UTC) == days.now + 7 * DAY
    assert list(forecast.forfeitures) == []

    # Still true a day later (600 left: 6 days): nothing more.
    await days.use(100)
    await days.next()
    assert await crossings(a) == []
    assert await a.state(rule.alert_id) == FIRED

    # A purchase makes it false at once: re-armed in the grant's transaction, no crossing.
    await q.grant(quantity=10_000)
    assert await crossings(a) == []
    assert await a.state(rule.alert_id) == ARMED

    # A burst of 10,000 calls: the next evaluation sees the rate jump, and it fires again.
    await days.use(10_000)
    assert await crossings(a) == []
    await days.next()
    (again,) = await crossings(a)
    assert (again.alert_id, again.condition) == (rule.alert_id, DEPLETION)
    assert again.remaining_quantity == 11_000 - 4 * 100 - 10_000
    # (10,000 + 100 x (0.9 + 0.81 + 0.729 + 0.6561)) / (1 + 0.9 + 0.81 + 0.729 + 0.6561)
    assert again.daily_rate == "2517.523"
    assert again.depletion_time.ToDatetime(UTC) <= days.now + DAY
    assert await a.state(rule.alert_id) == FIRED


async def test_more_than_n_forfeited_fires_once_rearms_when_false_and_fires_on_a_purchase(q, a):
    days = Days(q)
    first = await q.grant(quantity=1_000, expire=END_OF_JANUARY)
    # No usage: everything would be forfeited. True at creation: it fires at once.
    rule = await a.create(api=API, forfeiture=500)
    (crossed,) = await crossings(a)
    assert (crossed.alert_id, crossed.condition) == (rule.alert_id, FORFEITURE)
    assert crossed.WhichOneof("threshold") == "threshold_forfeiture_quantity"
    assert crossed.threshold_forfeiture_quantity == 500
    assert crossed.daily_rate == "0"
    assert crossed.forfeiture.package_id == first.package_id
    assert crossed.forfeiture.quantity == 1_000
    assert crossed.forfeiture.expire_time.ToDatetime(UTC) == END_OF_JANUARY
    assert not crossed.HasField("depletion_time")
    assert (await a.get_alert(rule.alert_id)).state == FIRED

    # Still true the next day: nothing more.
    await days.next()
    assert await crossings(a) == []

    # 300 calls a day from day 1: 700 left are used up in 2 days 8 hours, long before the
    # end of January: nothing forfeited, re-armed.
    await days.use(300)
    await days.next()
    assert await crossings(a) == []
    assert await a.state(rule.alert_id) == ARMED
    (forecast,) = (await q.forecast(api=API)).forecasts
    assert forecast.daily_rate == "300"
    assert list(forecast.forfeitures) == []
    assert forecast.depletion_time.ToDatetime(UTC) == days.now + timedelta(days=2, hours=8)

    # A purchase of 10,000 calls that end with January: 29 days x 300 = 8,700 of 10,700 are
    # used, 2,000 of the new package forfeited. The grant evaluates the rule: it fires.
    second = await q.grant(quantity=10_000, expire=END_OF_JANUARY)
    (again,) = await crossings(a)
    assert (again.alert_id, again.condition) == (rule.alert_id, FORFEITURE)
    assert (again.forfeiture.package_id, again.forfeiture.quantity) == (second.package_id, 2_000)
    assert again.daily_rate == "300"
    (forecast,) = (await q.forecast()).forecasts
    assert [(f.package_id, f.quantity) for f in forecast.forfeitures] == [
        (second.package_id, 2_000)
    ]
    assert forecast.forfeitures[0].expire_time.ToDatetime(UTC) == END_OF_JANUARY


async def test_the_due_work_evaluates_a_forecast_rule_at_most_once_an_hour(q, a):
    await q.grant(quantity=3_000)
    await q.report("burst", quantity=1_000, occur=START)
    await q.advance(timedelta(hours=23, minutes=30))
    # Today's calls are not a whole day yet: rate 0, armed (and stamped at 23:30).
    rule = await a.create(api=API, depletion_days=7)
    assert rule.state == ARMED
    # 00:10: yesterday's 1,000 calls make the rate 1,000 a day, 2,000 left: used up in 2
    # days. But the rule was evaluated 40 minutes ago: not yet.
    await q.advance(timedelta(minutes=40))
    assert await crossings(a) == []
    assert await a.state(rule.alert_id) == ARMED
    (forecast,) = (await q.forecast()).forecasts
    assert forecast.daily_rate == "1000"
    # 00:31: an hour and a minute since: evaluated, fired.
    await q.advance(timedelta(minutes=21))
    (crossed,) = await crossings(a)
    assert (crossed.alert_id, crossed.daily_rate) == (rule.alert_id, "1000")
    assert crossed.depletion_time.ToDatetime(UTC) == START + DAY + timedelta(minutes=31) + 2 * DAY


async def test_the_forecast_lists_each_region_and_api_with_packages_and_honours_filters(q):
    await q.grant(quantity=100)
    await q.grant(quantity=50, api=OTHER_API)
    await q.grant(quantity=70, region=OTHER_REGION)
    revoked = await q.grant(quantity=10, api="table")
    await q.revoke(revoked.package_id)

    everything = (await q.forecast()).forecasts
    assert [(f.region, f.api) for f in everything] == sorted(
        [(REGION, API), (REGION, OTHER_API), (OTHER_REGION, API)]
    )
    assert [
        (f.region, f.api) for f in (await q.forecast(region=REGION, api=OTHER_API)).forecasts
    ] == [(REGION, OTHER_API)]
    assert (await q.forecast(OTHER_ACCOUNT)).forecasts == []
    # The account's own token reads its own forecast; a master's reads are covered by the
    # isolation matrix.
    mine = await q.forecast(metadata=q.account())
    assert len(mine.forecasts) == 3


async def test_get_quota_forecast_errors_name_the_field_and_refuse_other_accounts(q):
    await expect_error(q.forecast(""), INVALID, "INVALID_FIELD", "account_id")
    await expect_error(q.forecast(region="mars-north-1"), INVALID, "UNKNOWN_REGION", "region")
    await expect_error(q.forecast(api="no-such-api"), INVALID, "UNKNOWN_API", "api")
    await expect_error(q.forecast(OTHER_ACCOUNT, metadata=q.account()), DENIED, "PERMISSION_DENIED")


async def test_get_quota_forecast_of_a_region_not_served(database_url, tmp_path):
    async with quota_server(database_url, tmp_path, quota_regions=REGION) as q:
        await expect_error(
            q.forecast(region=OTHER_REGION),
            grpc.StatusCode.FAILED_PRECONDITION,
            "REGION_NOT_SERVED",
        )


async def test_forecast_thresholds_are_checked_and_editable(a):
    await expect_error(
        a.create(api=API, depletion_days=0), INVALID, field="usage_alert.depletion_within_days"
    )
    await expect_error(
        a.create(api=API, depletion_days=3651), INVALID, field="usage_alert.depletion_within_days"
    )
    await expect_error(
        a.create(api=API, forfeiture=-1), INVALID, field="usage_alert.forfeiture_above_quantity"
    )
    rule = await a.create(api=API, quantity=5)
    edited = await a.update_alert(
        quota_pb2.UsageAlert(alert_id=rule.alert_id, depletion_within_days=3),
        paths=["depletion_within_days"],
    )
    assert edited.WhichOneof("threshold") == "depletion_within_days"
    assert (await a.get_alert(rule.alert_id)).depletion_within_days == 3
