"""Use case of usage statistics: an account's usage per minute, hour or billing day.

Minutes and hours are aligned to UTC. Days run from local midnight to local midnight in the
billing time zone, so across a DST change a day lasts 23 or 25 hours. The calendar work is
done here (`bucket_runs`, pure); the database only sums events per bucket.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from services.quota.adapters.stats_queries import BucketRun, usage_per_bucket
from services.quota.app.context import QuotaContext, check_account_id
from shared.db import UnitOfWork
from shared.errors import InvalidArgument
from shared.timeutil import from_micros, to_micros

# A request covers at most this many buckets, with usage or not: about 6.9 days of minutes,
# 416 days of hours or 27 years of days. It bounds the work and the size of the answer.
MAX_BUCKETS = 10_000
MINUTE_US = 60 * 1_000_000
HOUR_US = 60 * MINUTE_US
ONE_DAY = timedelta(days=1)


class Granularity(enum.IntEnum):
    """StatsGranularity's values (0, unspecified, is rejected)."""

    MINUTE = 1
    HOUR = 2
    DAY = 3


@dataclass(frozen=True)
class StatsBucket:
    """Usage in one bucket. `start_time` is the bucket's aligned start (UTC)."""

    start_time: datetime
    successful_calls: int
    failed_calls: int
    package_quantity: int
    pay_per_use_quantity: int


async def usage_stats(
    ctx: QuotaContext,
    tz: ZoneInfo,
    *,
    account_id: str,
    region: str,
    api: str,
    start_time: datetime | None,
    end_time: datetime | None,
    granularity: int,
) -> list[StatsBucket]:
    """Usage of `account_id` in `region` (one API, or every API summed when `api` is empty)
    by events that occurred in [start_time, end_time), per bucket of `granularity`.

    Only buckets with usage are returned, in time order. Each carries its aligned start, so
    the first one may start before `start_time` (a DAY bucket starts at local midnight in
    `tz`); only events inside the range are counted in it. successful_calls sums the quantity
    of billable (2xx) events, failed_calls that of the others. At most MAX_BUCKETS buckets
    may lie in the range, else INVALID_ARGUMENT names end_time.
    """
    check_account_id(account_id)
    ctx.check_region(region)
    if api:
        ctx.check_api(api)
    if start_time is None:
        raise InvalidArgument("start_time", "start_time is required")
    if end_time is None:
        raise InvalidArgument("end_time", "end_time is required")
    if end_time <= start_time:
        raise InvalidArgument("end_time", "end_time must be after start_time")
    try:
        unit = Granularity(granularity)
    except ValueError:
        raise InvalidArgument(
            "granularity", "granularity must be MINUTE, HOUR or DAY", granularity=granularity
        ) from None
    runs = bucket_runs(start_time, end_time, unit, tz)

    async def work(uow: UnitOfWork) -> list[StatsBucket]:
        rows = await usage_per_bucket(
            uow,
            account_id=account_id,
            region=region,
            api=api,
            start_us=to_micros(start_time),
            end_us=to_micros(end_time),
            runs=runs,
        )
        return [StatsBucket(from_micros(start), *totals) for start, *totals in rows]

    return await ctx.db.read(work)


# --- the calendar (pure) -------------------------------------------------------------------


def bucket_runs(
    start: datetime, end: datetime, granularity: Granularity, tz: ZoneInfo
) -> list[BucketRun]:
    """The buckets covering [start, end) as runs of equal width, in time order."""
    if granularity == Granularity.DAY:
        return _day_runs(start, end, tz)
    width = MINUTE_US if granularity == Granularity.MINUTE else HOUR_US
    first = to_micros(start) // width * width  # floor: right before 1970 too
    count = -(-(to_micros(end) - first) // width)  # ceiling
    _check_count(count)
    return [BucketRun(first, width)]


def local_day_start(day: date, tz: ZoneInfo) -> datetime:
    """The first instant of `day` on the calendar of `tz` (UTC): its local midnight (the first
    one, where midnight repeats), or the jump of the clocks where they skip over midnight."""
    midnight = datetime.combine(day, time(), tzinfo=tz)  # fold=0: the first of a repeat
    instant = midnight.astimezone(UTC)
    if _wall(instant.astimezone(tz)) == _wall(midnight):
        return instant
    # Midnight falls in a gap. Read with the offset after the jump it is an instant of the day
    # before; read with the offset before it, one after the jump. The day begins in between.
    before = to_micros(midnight.replace(fold=1).astimezone(UTC))
    after = to_micros(instant)
    while after - before > 1:
        middle = (before + after) // 2
        if from_micros(middle).astimezone(tz).date() >= day:
            after = middle
        else:
            before = middle
    return from_micros(after)


def _wall(value: datetime) -> tuple[int, ...]:
    return (value.year, value.month, value.day, value.hour, value.minute, value.second)


def _day_runs(start: datetime, end: datetime, tz: ZoneInfo) -> list[BucketRun]:
    # Cheap first: no walk over the days of a range that is far too long.
    if end - start > (MAX_BUCKETS + 1) * ONE_DAY:
        _check_count(MAX_BUCKETS + 1)
    end_us = to_micros(end)
    try:
        day = start.astimezone(tz).date()
        begin = to_micros(local_day_start(day, tz))
    except OverflowError:
        raise InvalidArgument(
            "start_time", "start_time is outside the calendar statistics cover"
        ) from None
    runs: list[BucketRun] = []
    count = 0
    while begin < end_us:
        try:
            day += ONE_DAY
            next_begin = to_micros(local_day_start(day, tz))
        except OverflowError:
            raise InvalidArgument(
                "end_time", "end_time is outside the calendar statistics cover"
            ) from None
        width = next_begin - begin
        # A day the zone skipped altogether (Samoa, 2011-12-30) is no bucket.
        if width > 0:
            count += 1
            _check_count(count)
            # Days of one length follow each other at that interval: one run.
            if not runs or runs[-1].width_us != width:
                runs.append(BucketRun(begin, width))
        begin = next_begin
    return runs


def _check_count(count: int) -> None:
    if count > MAX_BUCKETS:
        raise InvalidArgument(
            "end_time",
            f"the range from start_time to end_time spans more than {MAX_BUCKETS} buckets",
            max_buckets=MAX_BUCKETS,
        )
