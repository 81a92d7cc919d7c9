"""The calendar of usage statistics: which buckets cover a range.

Minutes and hours are aligned to UTC. Days run from local midnight to local midnight in the
billing time zone, so across a DST change a day lasts 23 or 25 hours; a day a zone skipped
altogether is no bucket. Buckets of one width that follow each other form one run, so the
database can compute every bucket start with one expression.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from shared.errors import InvalidArgument
from shared.timeutil import from_epoch_us, to_epoch_us

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


class GroupBy(enum.IntEnum):
    """UsageGroupBy's values: what a time bucket is split by (0 = not split)."""

    NONE = 0
    PROJECT = 1
    USER = 2


# A grouped answer holds at most this many buckets (time buckets times groups): it bounds the
# size of the answer as MAX_BUCKETS bounds the calendar.
MAX_GROUPED_BUCKETS = 10_000


@dataclass(frozen=True)
class BucketRun:
    """Consecutive buckets of one width: the k-th starts at `start_us + k * width_us`. A run
    lasts until the next run starts; the last one, until the end of the range."""

    start_us: int
    width_us: int


def bucket_runs(
    start: datetime, end: datetime, granularity: Granularity, tz: ZoneInfo
) -> list[BucketRun]:
    """The buckets covering [start, end) as runs of equal width, in time order."""
    if granularity == Granularity.DAY:
        return _day_runs(start, end, tz)
    width = MINUTE_US if granularity == Granularity.MINUTE else HOUR_US
    first = to_epoch_us(start) // width * width  # floor: right before 1970 too
    count = -(-(to_epoch_us(end) - first) // width)  # ceiling
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
    before = to_epoch_us(midnight.replace(fold=1).astimezone(UTC))
    after = to_epoch_us(instant)
    while after - before > 1:
        middle = (before + after) // 2
        if from_epoch_us(middle).astimezone(tz).date() >= day:
            after = middle
        else:
            before = middle
    return from_epoch_us(after)


def _wall(value: datetime) -> tuple[int, ...]:
    return (value.year, value.month, value.day, value.hour, value.minute, value.second)


def _day_runs(start: datetime, end: datetime, tz: ZoneInfo) -> list[BucketRun]:
    # Cheap first: no walk over the days of a range that is far too long.
    if end - start > (MAX_BUCKETS + 1) * ONE_DAY:
        _check_count(MAX_BUCKETS + 1)
    end_us = to_epoch_us(end)
    try:
        day = start.astimezone(tz).date()
        begin = to_epoch_us(local_day_start(day, tz))
    except OverflowError:
        raise InvalidArgument(
            "start_time", "start_time is outside the calendar statistics cover"
        ) from None
    runs: list[BucketRun] = []
    count = 0
    while begin < end_us:
        try:
            day += ONE_DAY
            next_begin = to_epoch_us(local_day_start(day, tz))
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
